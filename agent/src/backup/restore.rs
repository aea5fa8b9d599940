//! Restores from the repository: a new replica (`create_replica_methods`, Patroni's list, with
//! `pgbackrest` first so a new member does not load the primary) and a new cluster
//! (`bootstrap.method: pgbackrest`, point in time or end of WAL, then promoted).
//!
//! pgBackRest writes `restore_command` and the recovery target into `postgresql.auto.conf`.
//! That file wins over ours and is copied by `pg_basebackup`, so a stale target would follow
//! the cluster into every later replica: the restore's settings are removed as soon as they
//! have served (before a replica's first start, after the bootstrap's promotion), and our
//! managed `restore_command` takes over.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::postgres::conf::{self, ManagedFiles};
use crate::postgres::data_dir::{
    abandon_bootstrap, clear_dir, prepare_empty, strip_recovery_settings, UNFINISHED_MARKER,
};
use crate::postgres::probe::Probe;
use crate::postgres::replica::{self, Upstream};
use crate::postgres::supervisor::{StopMode, Supervisor};

use super::command::Invocation;
use super::settings::RecoveryTarget;
use super::{render, runner};

/// Restores the newest backup of `system` (any when `None`) as a standby (`restore
/// --type=standby --delta [--set=<label>]`).
async fn restore_standby(
    config: &Config,
    system: Option<&str>,
) -> Result<(), crate::backup::BackupError> {
    let Some((runner, resolved)) = runner(config) else {
        return Err("the pgbackrest section is not configured".into());
    };
    let mut args = vec!["--delta".to_owned(), "--type=standby".to_owned()];
    if let Some(system) = system {
        // After a major-version upgrade the newest backup may be of the system before it:
        // restored, it would be a replica of no one.
        let info = runner
            .info_json(&resolved.stanza, runner.timeout)
            .await
            .map_err(crate::backup::BackupError::caused_by)?;
        let label = super::report::newest_backup_of_system(&info, &resolved.stanza, system)
            .ok_or_else(|| {
                format!("the repository has no backup of this cluster's system {system}")
            })?;
        args.push(format!("--set={label}"));
    }
    let data_dir = &config.postgresql.data_dir;
    prepare_empty(data_dir)?;
    let result = runner
        .run(
            Invocation {
                what: "restore",
                stanza: &resolved.stanza,
                args,
                loud: true,
                capture: false,
            },
            &CancellationToken::new(),
        )
        .await
        .map_err(crate::backup::BackupError::caused_by);
    if let Err(e) = result {
        clear_dir(data_dir);
        return Err(e);
    }
    strip_recovery_settings(data_dir)
        .map_err(|e| format!("cannot clean postgresql.auto.conf after the restore: {e}"))?;
    Ok(())
}

/// Creates a replica by the configured methods in order; returns the method that worked.
/// Without `upstream` (no leader), only custom methods marked `no_leader` are tried, as
/// Patroni's `replica_method_can_work_without_replication_connection`.
pub async fn create_replica(
    config: &Config,
    bin_dir: &Path,
    upstream: Option<&Upstream>,
) -> Result<&'static str, crate::backup::BackupError> {
    use crate::postgres::replica_method::{self, ReplicaMethod};
    let methods: Vec<&str> = if config.postgresql.create_replica_methods.is_empty() {
        vec!["basebackup"]
    } else {
        config
            .postgresql
            .create_replica_methods
            .iter()
            .map(String::as_str)
            .collect()
    };
    let mut failures = Vec::new();
    for method in methods {
        let builtin = !ReplicaMethod::is_custom(config, method);
        let result = match (method, upstream) {
            ("pgbackrest", Some(upstream)) if builtin => {
                restore_standby(config, upstream.system_identifier.as_deref())
                    .await
                    .map(|()| "pgbackrest")
            }
            ("basebackup", Some(upstream)) => replica::basebackup(config, bin_dir, upstream)
                .await
                .map(|()| "basebackup")
                .map_err(crate::backup::BackupError::caused_by),
            ("pgbackrest" | "basebackup", None) if builtin => {
                Err("needs a leader (only custom methods marked no_leader run without one)".into())
            }
            (custom, upstream) => match ReplicaMethod::of(config, custom) {
                Ok(m) if upstream.is_none() && !m.no_leader => {
                    Err("needs a leader: it is not marked no_leader".into())
                }
                Ok(m) => replica_method::create(&m, config, upstream)
                    .await
                    .map(|()| "custom")
                    .map_err(crate::backup::BackupError::from),
                Err(e) => Err(e.to_string().into()),
            },
        };
        match result {
            Ok(used) => {
                let leader = upstream.map_or("(none)", |u| u.name.as_str());
                info!(method = used, %leader, "replica created");
                return Ok(used);
            }
            Err(e) => {
                let e = crate::error::error_chain(&e);
                warn!(method, error = %e, "replica creation method failed; trying the next one");
                failures.push(format!("{method}: {e}"));
            }
        }
    }
    Err(format!(
        "every replica creation method failed ({})",
        failures.join("; ")
    )
    .into())
}

/// The `pgbackrest restore` arguments for a bootstrap.
fn bootstrap_args(config: &Config) -> Result<(String, Vec<String>), String> {
    let Some((_, resolved)) = runner(config) else {
        return Err("the pgbackrest section is not configured".into());
    };
    let boot = config.bootstrap.pgbackrest.clone().unwrap_or_default();
    let source = boot
        .stanza
        .clone()
        .unwrap_or_else(|| resolved.stanza.clone());
    let mut args = Vec::new();
    let target = boot.target();
    match &target {
        RecoveryTarget::EndOfWal => args.push("--type=default".into()),
        RecoveryTarget::Immediate => args.push("--type=immediate".into()),
        RecoveryTarget::Time(t) => {
            args.push("--type=time".into());
            args.push(format!("--target={t}"));
        }
        RecoveryTarget::Lsn(l) => {
            args.push("--type=lsn".into());
            args.push(format!("--target={l}"));
        }
    }
    if target != RecoveryTarget::EndOfWal {
        args.push("--target-action=promote".into());
        if matches!(target, RecoveryTarget::Time(_) | RecoveryTarget::Lsn(_)) && !boot.inclusive() {
            args.push("--target-exclusive".into());
        }
    }
    if let Some(tl) = boot.timeline() {
        args.push(format!("--target-timeline={tl}"));
    }
    if let Some(set) = &boot.set {
        args.push(format!("--set={set}"));
    }
    if let Some(repo) = boot.repo {
        args.push(format!("--repo={repo}"));
    }
    // During recovery WAL comes from the source stanza; after promotion our managed
    // restore_command (the configured stanza) takes over.
    args.push(format!(
        "--recovery-option=restore_command={}",
        render::restore_command(&resolved, &source)
    ));
    Ok((source, args))
}

/// Refuses to bootstrap a cluster that would archive into a stanza that already exists: a
/// restored cluster has its source's system identifier, so pgBackRest would accept its WAL
/// and backups into the source's (or an earlier restore's) history. A repository that cannot
/// be read is not a reason to refuse here: the restore itself then fails with pgBackRest's
/// error.
pub async fn refuse_existing_stanza(config: &Config) -> Result<(), crate::backup::BackupError> {
    let Some((_, resolved)) = runner(config) else {
        return Ok(());
    };
    match stanza_system_ids(config).await {
        ids if ids.is_empty() => Ok(()),
        ids => Err(format!(
            "the stanza {stanza:?} (pgbackrest.stanza) already holds the backups or WAL of \
             system {ids}; a new cluster (initdb, or restored from a backup) must archive into \
             a stanza of its own: set pgbackrest.stanza to a new name (for example \
             {stanza}-restored), or delete the old stanza with `pgbackrest stanza-delete` if \
             it is no longer needed",
            stanza = resolved.stanza,
            ids = ids.join(", ")
        )
        .into()),
    }
}

/// At start, with a data directory: refuses a stanza that holds another system's backups or
/// WAL (pgBackRest would refuse every segment and backup of this cluster; the agent would run
/// without any). Nothing is refused when the repository cannot be read.
pub async fn refuse_foreign_stanza(config: &Config) -> Result<(), crate::backup::BackupError> {
    let Some((_, resolved)) = runner(config) else {
        return Ok(());
    };
    let data_dir = &config.postgresql.data_dir;
    if !data_dir.join("global/pg_control").exists() {
        return Ok(());
    }
    // Upgraded to a new major version (`pgwarden upgrade-data-dir`): the stanza holds the old
    // system until the leader's stanza-upgrade, which keeps both.
    if data_dir.join(super::STANZA_UPGRADE_MARKER).exists() {
        return Ok(());
    }
    let Ok(control) = crate::postgres::controldata::read(
        &config.postgres_bin_dirs().for_data_dir(data_dir),
        data_dir,
    )
    .await
    else {
        return Ok(());
    };
    let ids = stanza_system_ids(config).await;
    if ids.is_empty() || ids.contains(&control.system_identifier) {
        return Ok(());
    }
    Err(format!(
        "the stanza {stanza:?} (pgbackrest.stanza) holds the backups or WAL of system {ids}, \
         but this data directory is system {ours}: set pgbackrest.stanza to this cluster's \
         own stanza (a new name creates one)",
        stanza = resolved.stanza,
        ids = ids.join(", "),
        ours = control.system_identifier
    )
    .into())
}

/// The system identifiers `pgbackrest.stanza` holds backups or WAL of; empty when it does not
/// exist or the repository cannot be read.
async fn stanza_system_ids(config: &Config) -> Vec<String> {
    let Some((runner, resolved)) = runner(config) else {
        return Vec::new();
    };
    let out = match runner
        .info_json(&resolved.stanza, Duration::from_secs(10))
        .await
    {
        Ok(out) => out,
        Err(e) => {
            warn!(stanza = %resolved.stanza, error = %crate::error::error_chain(&e), "cannot read the stanza this cluster archives into; not checking whose it is");
            return Vec::new();
        }
    };
    super::report::stanza_system_ids(&out, &resolved.stanza)
}

/// The bootstrap task for `bootstrap.method: pgbackrest`: restore, recover to the target,
/// promote, then restart once without the recovery settings and create the roles.
///
/// A failure at any step leaves nothing a restart would take for a cluster: postgres is
/// stopped and the data directory set aside ([`abandon_bootstrap`]); the HA loop then withdraws
/// `initialize` and `leader` and exits, and a restart (with a corrected target) restores
/// afresh.
pub async fn bootstrap(
    config: &Config,
    supervisor: &Supervisor,
    probe: &Probe,
    files: &ManagedFiles,
) -> Result<(), crate::backup::BackupError> {
    let data_dir = &config.postgresql.data_dir;
    let created = prepare_empty(data_dir)?;
    if let Err(e) = refuse_existing_stanza(config).await {
        if created {
            let _ = std::fs::remove_dir(data_dir);
        }
        return Err(e);
    }
    match restore_and_promote(config, supervisor, probe, files).await {
        Ok(()) => Ok(()),
        Err(e) => {
            let what = abandon_bootstrap(supervisor, probe, data_dir, created).await;
            Err(format!("{e}; {what}, so the next start restores afresh").into())
        }
    }
}

async fn restore_and_promote(
    config: &Config,
    supervisor: &Supervisor,
    probe: &Probe,
    files: &ManagedFiles,
) -> Result<(), crate::backup::BackupError> {
    let Some((runner, resolved)) = runner(config) else {
        return Err("the pgbackrest section is not configured".into());
    };
    let data_dir = &config.postgresql.data_dir;
    let (source, args) = bootstrap_args(config)?;
    info!(stanza = %source, ?args, "restoring a new cluster from the repository");
    runner
        .run(
            Invocation {
                what: "restore",
                stanza: &source,
                args,
                loud: true,
                capture: false,
            },
            &CancellationToken::new(),
        )
        .await
        .map_err(crate::backup::BackupError::caused_by)?;
    std::fs::write(data_dir.join(UNFINISHED_MARKER), "")
        .map_err(|e| format!("cannot mark the restored data directory: {e}"))?;
    conf::write(data_dir, files)
        .map_err(|e| format!("cannot write the configuration files: {e}"))?;
    supervisor
        .start()
        .await
        .map_err(crate::backup::BackupError::caused_by)?;
    let deadline = Instant::now() + runner.timeout;
    loop {
        if Instant::now() > deadline {
            return Err("recovery from the backup did not finish within pgbackrest.timeout".into());
        }
        if !supervisor.state().is_running() {
            return Err(
                "postgres stopped during recovery from the backup (is the recovery target \
                 reachable with the archived WAL? see the postgres log lines above)"
                    .into(),
            );
        }
        if supervisor.state().accepts_connections() {
            if let Ok(s) = probe.status().await {
                if !s.in_recovery {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    info!("recovery from the backup reached its target and promoted; creating this cluster's stanza, then restarting without the recovery settings");
    // The new timeline's first segments and history file are archived right away: with the
    // stanza not created yet, each attempt failed with an ERROR in the log until the leader's
    // stanza-create ran. A failure here is not fatal: the leader retries it.
    if let Err(e) = runner
        .run(
            Invocation {
                what: "stanza-create",
                stanza: &resolved.stanza,
                args: vec![],
                loud: true,
                capture: false,
            },
            &CancellationToken::new(),
        )
        .await
    {
        warn!(stanza = %resolved.stanza, error = %crate::error::error_chain(&e), "cannot create this cluster's stanza yet; the leader retries");
    }
    supervisor
        .stop(StopMode::Fast, Duration::from_secs(120))
        .await
        .map_err(crate::backup::BackupError::caused_by)?;
    probe.reset().await;
    strip_recovery_settings(data_dir)
        .map_err(|e| format!("cannot clean postgresql.auto.conf: {e}"))?;
    let _ = std::fs::remove_file(data_dir.join("recovery.signal"));
    supervisor
        .start()
        .await
        .map_err(crate::backup::BackupError::caused_by)?;
    if !supervisor.wait_ready(Duration::from_secs(120)).await {
        return Err("postgres did not accept connections after the restore".into());
    }
    crate::postgres::initdb::post_bootstrap(config, probe)
        .await
        .map_err(crate::backup::BackupError::caused_by)?;
    std::fs::remove_file(data_dir.join(UNFINISHED_MARKER))
        .map_err(|e| format!("cannot remove {UNFINISHED_MARKER}: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_arguments_follow_the_recovery_target() {
        let mut c: Config = serde_yaml::from_str(
            "scope: new\npostgresql: {data_dir: /d, listen: '127.0.0.1:5432'}\n\
             pgbackrest: {repos: [{path: /r}, {path: /r2}]}\nbootstrap:\n  method: pgbackrest\n  \
             pgbackrest:\n    stanza: old\n    repo: 2\n    recovery_conf: {recovery_target_time: '2026-01-01 00:00:00+00', \
             recovery_target_inclusive: false}\n",
        )
        .expect("yaml");
        let (source, args) = bootstrap_args(&c).expect("args");
        assert_eq!(source, "old");
        assert!(args.contains(&"--type=time".to_owned()));
        assert!(args.contains(&"--target=2026-01-01 00:00:00+00".to_owned()));
        assert!(args.contains(&"--target-action=promote".to_owned()));
        assert!(args.contains(&"--target-exclusive".to_owned()));
        assert!(args.contains(&"--repo=2".to_owned()));
        assert!(args
            .iter()
            .any(|a| a.starts_with("--recovery-option=restore_command=")
                && a.contains("--stanza=old")));
        c.bootstrap.pgbackrest = None;
        let (source, args) = bootstrap_args(&c).expect("args");
        assert_eq!(source, "new");
        assert!(args.contains(&"--type=default".to_owned()));
        assert!(!args.iter().any(|a| a.starts_with("--target-action")));
    }
}
