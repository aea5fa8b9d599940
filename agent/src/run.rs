//! Wiring of the agent's long-running tasks under one cancellation scope: the HA loop, the
//! postgres supervisor, the REST API; signals and, as PID 1, reaping orphans.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{self, ApiContext};
use crate::config::{Config, Timing};
use crate::dcs::etcd::{EtcdDcs, EtcdSettings};
use crate::dcs::kubernetes::{KubeDcs, KubeSettings};
use crate::dcs::Dcs;
use crate::ha::{self, HaLoop};
use crate::postgres::agent_lock::AgentLock;
use crate::postgres::callbacks::Callbacks;
use crate::postgres::conf::split_listen;
use crate::postgres::fence_guard::GuardSpawn;
use crate::postgres::probe::{LocalConnection, Probe};
use crate::postgres::supervisor::{Supervisor, SupervisorSettings};

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("pgwarden must not run as root: PostgreSQL refuses to, and the data directory must belong to the postgres user")]
    Root,
    #[error("cannot listen for the REST API on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the DCS client")]
    Dcs(#[source] crate::dcs::DcsError),
    #[error("another member named {name:?} is already running (its REST API at {url} answers)")]
    DuplicateName { name: String, url: String },
    /// The message is the HA error's own (transparent: printed once, not as "x: x").
    #[error(transparent)]
    Ha(#[from] ha::HaError),
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("REST API TLS: {0}")]
    Tls(String),
    #[error("pgBackRest")]
    Backup(#[source] crate::backup::BackupError),
    #[error("the data directory's lock")]
    Lock(#[source] crate::postgres::agent_lock::LockError),
    #[error("the major-version upgrade")]
    Upgrade(#[source] crate::postgres::upgrade::UpgradeError),
    #[error("the PostgreSQL binaries")]
    Binaries(#[source] crate::postgres::upgrade::UpgradeError),
    #[error("cannot read the data directory's control file")]
    ControlData(#[source] crate::postgres::controldata::ControlDataError),
    #[error(
        "the cluster's `initialize` key says {found}, but the data directory's system identifier \
         is {ours}: it is not this cluster's data"
    )]
    ForeignInitialize { found: String, ours: String },
    #[error("{0} is running in the cluster: stop every member (replicas first, the leader last) before upgrading the leader's data directory")]
    ClusterRunning(String),
}

fn local_connection(config: &Config) -> LocalConnection {
    let socket_dir = config
        .postgresql
        .parameters
        .get("unix_socket_directories")
        .map(|v| v.as_setting())
        .and_then(|dirs| dirs.split(',').next().map(|d| d.trim().to_owned()))
        .filter(|d| !d.is_empty());
    let (hosts, port) = split_listen(&config.postgresql.listen);
    let host = match (config.postgresql.use_unix_socket, socket_dir) {
        (true, Some(dir)) => dir,
        _ => {
            let first = hosts.split(',').next().unwrap_or("").trim().to_owned();
            match first.as_str() {
                "" | "*" | "0.0.0.0" => "127.0.0.1".to_owned(),
                "::" => "::1".to_owned(),
                _ => first,
            }
        }
    };
    let superuser = &config.postgresql.authentication.superuser;
    LocalConnection {
        host,
        port: port.unwrap_or(5432),
        user: superuser.username.clone(),
        password: superuser.password.clone(),
        timeout: Duration::from_secs(5),
    }
}

/// Runs the agent until SIGTERM/SIGINT or a fatal error.
pub async fn run_agent(config: Config, reload: Option<ha::ReloadFn>) -> Result<(), RunError> {
    if nix::unistd::geteuid().is_root() {
        return Err(RunError::Root);
    }
    let config = Arc::new(config);
    // The HA loop derives the timing from the DCS `config` key; the DCS client follows it.
    let (timing_tx, timing_rx) = watch::channel(Timing::bootstrap(&config));
    let dcs = connect_dcs(&config, timing_rx).await?;
    // Before binding the REST API, as Patroni: a second agent started by mistake with the same
    // REST port hears about the name, not about the port.
    refuse_duplicate_name(&config, dcs.as_ref()).await?;
    // Before anything touches postgres: a predecessor's fence guard may still be proving its
    // postgres stopped and releasing the leader.
    let data_lock = AgentLock::acquire(&config.postgresql.data_dir, LOCK_PATIENCE)
        .await
        .map_err(RunError::Lock)?;
    api::raise_descriptor_limit();
    let listener = tokio::net::TcpListener::bind(&config.restapi.listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: config.restapi.listen.clone(),
            source,
        })?;

    crate::backup::write_config(&config).map_err(RunError::Backup)?;
    // An upgrade that died between moving the old data directory aside and the new one into
    // place: the new one is complete, so it becomes the data directory.
    if crate::postgres::upgrade::finish_interrupted_swap(&config.postgresql.data_dir)
        .map_err(RunError::Upgrade)?
    {
        tracing::warn!(data_dir = %config.postgresql.data_dir.display(), "finished an interrupted major-version upgrade: its upgraded data directory was moved into place");
    }
    crate::postgres::data_dir::discard_unfinished_bootstrap(&config.postgresql.data_dir);
    crate::postgres::upgrade::check_binaries_match(
        &config.postgres_bin_dirs(),
        &config.postgresql.data_dir,
    )
    .await
    .map_err(RunError::Binaries)?;
    crate::backup::restore::refuse_foreign_stanza(&config)
        .await
        .map_err(RunError::Backup)?;
    let shutdown = CancellationToken::new();
    let pg_changed = Arc::new(Notify::new());
    let callbacks = Callbacks::new(&config.scope, config.postgresql.callbacks.clone());
    // A reload that re-reads the file also replaces the callbacks; one the loop refuses
    // (another name or scope) leaves them as they were.
    let reload = reload.map(|reload| -> ha::ReloadFn {
        let callbacks = callbacks.clone();
        let (name, scope) = (config.name.clone(), config.scope.clone());
        Box::new(move || {
            let new = reload()?;
            if new.name == name && new.scope == scope {
                callbacks.set_commands(new.postgresql.callbacks.clone());
            }
            Ok(new)
        })
    });
    let guard = spawn_fence_guard(&config, &data_lock);
    if let Some(guard) = &guard {
        let guard = guard.clone();
        dcs.on_release_token(Arc::new(move |token| guard.set_release_token(token)));
    }
    let (supervisor, supervisor_task) = Supervisor::spawn(
        SupervisorSettings {
            bin_dirs: config.postgres_bin_dirs(),
            data_dir: config.postgresql.data_dir.clone(),
            stop_with_agent: true,
            guard: guard.clone(),
            callbacks,
        },
        pg_changed.clone(),
    );
    let probe = Probe::new(local_connection(&config));
    let (status_tx, status_rx) = watch::channel(Arc::new(ha::initial_status(&config)));
    let status_rx_commands = status_rx.clone();
    let (commands_tx, commands_rx) = mpsc::channel(16);

    let tls = match (&config.restapi.certfile, &config.restapi.keyfile) {
        (Some(cert), Some(key)) => Some(api::server_tls(cert, key).map_err(RunError::Tls)?),
        _ => None,
    };
    crate::peer::configure_client_tls(config.restapi.cafile.as_deref()).map_err(RunError::Tls)?;
    let backup = crate::backup::spawn(
        &config,
        dcs.clone(),
        status_rx.clone(),
        probe.clone(),
        shutdown.child_token(),
    );
    let interrupter = backup
        .as_ref()
        .map(|(handle, _)| handle.interrupter())
        .unwrap_or_default();
    let (backup, backup_task) = match backup {
        Some((handle, task)) => (Some(handle), Some(task)),
        None => (None, None),
    };
    let failsafe = Arc::new(ha::failsafe::Failsafe::new());
    let api_context = ApiContext {
        status: status_rx,
        probe: probe.clone(),
        auth: config
            .restapi
            .authentication
            .as_ref()
            .map(|c| (c.username.clone(), c.password.clone().unwrap_or_default())),
        commands: commands_tx,
        backup,
        failsafe: failsafe.clone(),
    };
    let peers = ha::local::HttpPeers {
        auth: api_context.auth.clone(),
    };
    let api_task = match tls {
        Some(tls) => tokio::spawn(api::serve_tls(
            listener,
            api_context,
            tls,
            shutdown.child_token(),
        )),
        None => tokio::spawn(api::serve(listener, api_context, shutdown.child_token())),
    };
    let (loop_tx, loop_rx) = mpsc::channel(4);
    let loop_tx_signals = loop_tx.clone();
    tokio::spawn(api::commands::serve(
        commands_rx,
        Arc::new(api::commands::CommandContext {
            dcs: dcs.clone(),
            status: status_rx_commands,
            to_loop: loop_tx,
            name: config.name.clone(),
        }),
    ));
    tokio::spawn(signals(shutdown.clone(), loop_tx_signals));
    if nix::unistd::getpid().as_raw() == 1 {
        tokio::spawn(reap_orphans());
    }

    info!(name = %config.name, scope = %config.scope, api = %config.restapi.listen, "pgwarden agent starting");
    let ha = HaLoop::new(
        config.clone(),
        dcs,
        ha::local::LocalPostgres::new(&config, supervisor.clone(), probe).with_backups(interrupter),
        peers,
        ha::local::SystemRuntime,
        status_tx,
        pg_changed,
    )
    .with_requests(loop_rx)
    .with_failsafe(failsafe)
    .with_timing(timing_tx);
    let ha = match reload {
        // The log settings take effect at once, as Patroni's logger reloads them.
        Some(r) => ha.with_reload(Box::new(move || {
            let config = r()?;
            for warning in crate::logging::reload(&config.log) {
                warn!("{warning}");
            }
            Ok(config)
        })),
        None => ha,
    };
    // A task rather than `block_on`'s own future: waking that one goes through the runtime's
    // eventfd (a write and another epoll_wait), while a task woken by another task is only put
    // on the run queue. The HA loop is woken several times per cycle by the DCS and postgres
    // connection tasks.
    let result = match tokio::spawn(ha.run(shutdown.clone())).await {
        Ok(result) => result,
        Err(e) => Err(ha::HaError::Aborted(e)),
    };
    shutdown.cancel();
    drop(supervisor);
    let _ = tokio::time::timeout(Duration::from_secs(5), api_task).await;
    if let Some(task) = backup_task {
        // The service kills a running pgBackRest command with its process group.
        let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
    }
    supervisor_task.abort();
    if let Err(e) = &result {
        // The guard's crash path releases the leader, if we still hold it, once postgres is
        // gone (it dies with this process).
        error!(error = %e, "the agent stops");
    } else {
        if let Some(guard) = &guard {
            guard.clean_exit();
        }
        info!("the agent stopped cleanly");
    }
    drop(data_lock);
    result.map_err(RunError::from)
}

/// The DCS the configuration names: the Kubernetes API with a `kubernetes` section, else etcd.
async fn connect_dcs(
    config: &Config,
    timing: watch::Receiver<Timing>,
) -> Result<Arc<dyn Dcs>, RunError> {
    if let Some(settings) = KubeSettings::from_config(config, timing.clone()) {
        let dcs = KubeDcs::connect(settings).await.map_err(RunError::Dcs)?;
        info!(namespace = %dcs.namespace(), "Kubernetes mode: the leader is a Lease");
        return Ok(Arc::new(dcs));
    }
    let etcd = config.etcd3.clone().unwrap_or_default();
    let mut endpoints = etcd.hosts.clone();
    endpoints.extend(etcd.host.clone());
    let dcs = EtcdDcs::connect(EtcdSettings {
        endpoints,
        username: etcd.username.clone(),
        password: etcd.password.clone(),
        namespace: config.namespace.clone(),
        scope: config.scope.clone(),
        name: config.name.clone(),
        timing,
    })
    .await
    .map_err(RunError::Dcs)?;
    Ok(Arc::new(dcs))
}

/// How long a starting agent waits for the data directory's lock (a predecessor's fence guard
/// needs at most its proof and release deadlines, about 25 s).
const LOCK_PATIENCE: Duration = Duration::from_secs(60);

/// Starts the out-of-process fence; without it a frozen agent could not stop postgres in time,
/// so failing to start it is logged as an error but does not stop the agent. After a crash it
/// releases the leader by running this executable as `release-leader` with our own arguments.
fn spawn_fence_guard(
    config: &Config,
    lock: &AgentLock,
) -> Option<Arc<crate::postgres::fence_guard::FenceGuard>> {
    let exe = std::env::current_exe().ok()?;
    let mut release = vec![exe.clone().into_os_string(), "release-leader".into()];
    release.extend(std::env::args_os().skip(1));
    let spawn = GuardSpawn {
        data_dir: &config.postgresql.data_dir,
        lock: Some(lock.file()),
        release,
    };
    match crate::postgres::fence_guard::FenceGuard::spawn(&exe, spawn) {
        Ok(guard) => Some(Arc::new(guard)),
        Err(e) => {
            error!(error = %e, "cannot start the fence guard; a frozen agent would not be fenced");
            None
        }
    }
}

/// After our agent died (run by its fence guard, see `crate::postgres::crash_release`):
/// releases the leader record `token` names if it is still ours.
pub async fn release_dead_leader(config: &Config, token: &str) -> Result<bool, RunError> {
    let (_timing_tx, timing_rx) = watch::channel(Timing::bootstrap(config));
    let dcs = connect_dcs(config, timing_rx).await?;
    if !replaceable(config, dcs.as_ref()).await {
        info!(
            name = %config.name,
            "no other member can take over now (or the cluster is paused); the leader record \
             is kept, so that this member's agent, restarted, can resume (else its lease runs out)"
        );
        return Ok(false);
    }
    let released = dcs
        .release_dead_leader(token)
        .await
        .map_err(RunError::Dcs)?;
    if released {
        info!(name = %config.name, "released the leader record of this member's dead agent");
    } else {
        info!(name = %config.name, "the leader record was no longer this member's dead agent's");
    }
    Ok(released)
}

/// What `pgwarden upgrade-data-dir` did to a member's data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberUpgrade {
    /// The cluster's data (a cleanly stopped primary) was upgraded.
    Upgraded(crate::postgres::upgrade::UpgradeOutcome),
    /// A replica of the cluster as it was before its leader's data was upgraded: moved aside
    /// (kept, not deleted), so the agent clones the upgraded leader at its next start.
    MovedAsideForClone {
        from_major: u32,
        kept: std::path::PathBuf,
    },
}

/// `pgwarden upgrade-data-dir`, one member at a time, the leader's data first
/// (docs/upgrade.md):
///
/// - The cluster's data (its system identifier is `initialize`'s): upgraded
///   ([`crate::postgres::upgrade`]), then `initialize` records the new system identifier
///   (pg_upgrade's cluster keeps the one its initdb gave it, and an agent refuses a data
///   directory whose identifier is not the cluster's). Refused, before anything changes, while
///   another member is registered or a leader holds the key: they would keep running the old
///   version on the old identifier.
/// - A member whose identifier is no longer `initialize`'s and whose data is of an older major
///   version than the new binaries: a replica of the cluster before the upgrade. Its data is
///   moved aside, so its agent clones the upgraded leader (on the new binaries, see
///   [`crate::config::BinDirs`]).
///
/// The caller holds the data directory's lock.
pub async fn upgrade_stopped_member(
    config: &Config,
    request: &crate::postgres::upgrade::UpgradeRequest,
) -> Result<MemberUpgrade, RunError> {
    use crate::postgres::{controldata, upgrade};
    let from = upgrade::data_dir_major(&request.data_dir).map_err(RunError::Upgrade)?;
    let before = controldata::read(&request.old_bin_dir, &request.data_dir)
        .await
        .map_err(RunError::ControlData)?;
    let (_timing_tx, timing_rx) = watch::channel(Timing::bootstrap(config));
    let dcs = connect_dcs(config, timing_rx).await?;
    let view = dcs.cluster().await.map_err(RunError::Dcs)?;
    let recorded = view.initialize_value().map(str::to_owned);
    if let Some(found) = recorded
        .as_ref()
        .filter(|v| **v != before.system_identifier)
    {
        let to = upgrade::binaries_major(&request.new_bin_dir)
            .await
            .map_err(RunError::Upgrade)?;
        if from >= to {
            return Err(RunError::ForeignInitialize {
                found: found.clone(),
                ours: before.system_identifier.clone(),
            });
        }
        if crate::postgres::supervisor::live_postmaster_pid(&request.data_dir).is_some() {
            return Err(RunError::Upgrade(upgrade::UpgradeError::Running(
                request.data_dir.clone(),
            )));
        }
        let kept = upgrade::kept_dir_of(&request.data_dir, from);
        if kept.exists() {
            return Err(RunError::Upgrade(upgrade::UpgradeError::InTheWay(kept)));
        }
        std::fs::rename(&request.data_dir, &kept).map_err(|source| {
            RunError::Upgrade(upgrade::UpgradeError::Io {
                what: "move aside",
                path: request.data_dir.clone(),
                source,
            })
        })?;
        info!(kept = %kept.display(), ours = %before.system_identifier, cluster = %found, "moved a replica's data directory of the cluster before its upgrade aside; the agent clones the upgraded leader");
        return Ok(MemberUpgrade::MovedAsideForClone {
            from_major: from,
            kept,
        });
    }
    // The local checks first: they name the data directory's own problem.
    upgrade::preflight(request)
        .await
        .map_err(RunError::Upgrade)?;
    if let Some(leader) = &view.leader {
        return Err(RunError::ClusterRunning(format!(
            "the leader {:?}",
            leader.name
        )));
    }
    // Our own record may outlive a crash; the lock we hold shows our agent is not running.
    if let Some(member) = view.members.iter().find(|m| m.name != config.name) {
        return Err(RunError::ClusterRunning(format!(
            "the member {:?}",
            member.name
        )));
    }
    let outcome = upgrade::upgrade(request).await.map_err(RunError::Upgrade)?;
    if config.pgbackrest.is_some() {
        // The repository's stanza describes the old version: the leader's backup service
        // upgrades it (crate::backup::service).
        let marker = request.data_dir.join(crate::backup::STANZA_UPGRADE_MARKER);
        if let Err(e) = std::fs::write(&marker, format!("{}\n", outcome.from_major)) {
            warn!(path = %marker.display(), error = %e, "cannot leave the stanza-upgrade marker: run `pgbackrest stanza-upgrade` by hand");
        }
    }
    let after = controldata::read(&request.new_bin_dir, &request.data_dir)
        .await
        .map_err(RunError::ControlData)?;
    if recorded.is_some() {
        dcs.set_initialize(&after.system_identifier)
            .await
            .map_err(RunError::Dcs)?;
        info!(old = %before.system_identifier, new = %after.system_identifier, "recorded the upgraded cluster's system identifier in `initialize`");
    }
    Ok(MemberUpgrade::Upgraded(outcome))
}

/// Whether another member could take the lock now, by the race's own eligibility rule over
/// the members' `/patroni` answers. A read that fails counts as "yes": the release stays
/// conditional, and the lease would run out anyway.
async fn replaceable(config: &Config, dcs: &dyn Dcs) -> bool {
    let Ok(view) = dcs.cluster().await else {
        return true;
    };
    // Paused: nobody takes over automatically, and the restarted agent resumes with the key.
    if view.is_paused() {
        return false;
    }
    let dynamic = match view.config.as_ref() {
        Some(raw) => crate::config::DynamicConfig::from_dcs(&raw.value, &config.bootstrap.dcs).0,
        None => config.bootstrap.dcs.clone(),
    };
    let mut peers = Vec::new();
    for member in view.members.iter().filter(|m| m.name != config.name) {
        let status =
            crate::peer::fetch_status(&member.name, &member.record.api_url, Duration::from_secs(2))
                .await
                .ok();
        peers.push(ha::observe::PeerAnswer {
            name: member.name.clone(),
            status,
        });
    }
    ha::decide::someone_else_may_take_over(
        &view,
        &config.name,
        &peers,
        dynamic.synchronous_mode.race_rule(),
        dynamic.maximum_lag_on_failover,
    )
}

/// Patroni refuses to start when a member with our name answers its REST API (§2.10).
async fn refuse_duplicate_name(config: &Config, dcs: &dyn Dcs) -> Result<(), RunError> {
    let Ok(view) = dcs.cluster().await else {
        return Ok(());
    };
    let Some(member) = view.member(&config.name) else {
        return Ok(());
    };
    let url = member.record.api_url.replace("/patroni", "/liveness");
    if crate::peer::probe_liveness(&url, Duration::from_secs(3)).await {
        // Patroni's words and level (`logger.fatal`), which its users' alerting matches.
        error!(
            target: crate::logging::CRITICAL_TARGET,
            "Can't start; there is already a node named '{}' running", config.name
        );
        return Err(RunError::DuplicateName {
            name: config.name.clone(),
            url,
        });
    }
    Ok(())
}

/// SIGHUP: reload the configuration file. First SIGTERM/SIGINT: graceful shutdown. Second: exit at once (postgres gets SIGQUIT from the
/// parent-death signal).
async fn signals(shutdown: CancellationToken, to_loop: mpsc::Sender<ha::commands::LoopRequest>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        error!("cannot install signal handlers");
        return;
    };
    let mut count = 0;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {
                info!("SIGHUP: reloading the configuration");
                let (reply, _answer) = tokio::sync::oneshot::channel();
                let _ = to_loop.send(ha::commands::LoopRequest::Reload { reply }).await;
                continue;
            }
        }
        count += 1;
        if count == 1 {
            info!("received a termination signal; shutting down gracefully");
            shutdown.cancel();
        } else {
            warn!("second termination signal; exiting immediately");
            std::process::exit(1);
        }
    }
}

/// As PID 1 (a container's entrypoint without `pgwarden-init`, which the image uses; see
/// [`crate::init`]) orphans are re-parented to us and must be reaped. Reaping
/// with `waitpid(-1)` would steal the exit status of children tokio waits for (postgres, initdb),
/// so only zombies that stayed unreaped across two scans — i.e. nobody is waiting for them — are
/// collected, by PID.
async fn reap_orphans() {
    use std::collections::HashSet;
    let me = std::process::id();
    let mut previous: HashSet<i32> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let mut zombies = HashSet::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            continue;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the parenthesised command: state, ppid, ...
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next();
            let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
            if state == Some("Z") && ppid == Some(me) {
                zombies.insert(pid);
            }
        }
        for pid in zombies.intersection(&previous) {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(*pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
        previous = zombies;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ha_error_is_reported_once() {
        let e = RunError::from(ha::HaError::Fatal(
            "data directory belongs to another cluster".into(),
        ));
        assert_eq!(
            crate::error::error_chain(&e),
            "data directory belongs to another cluster"
        );
    }
}
