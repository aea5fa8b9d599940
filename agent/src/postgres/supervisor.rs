//! The postmaster's supervisor: one task owns the child process for its whole life.
//!
//! # Guarantees
//! - The postmaster is our child, in its own process group, so signals to the agent's group
//!   (a terminal's Ctrl-C) do not reach it and shutdown is always ours to order.
//! - With `stop_with_agent` (the default) it gets SIGQUIT (immediate shutdown) from the kernel if
//!   the agent dies, so a primary never outlives its agent. The spawn happens on the runtime's
//!   own thread: the parent-death signal fires when the *thread* that forked exits, and the
//!   agent's runtime thread lives as long as the process.
//! - The fence: while armed, reaching the deadline stops postgres immediately, whatever the HA
//!   loop is doing (it may be blocked on a DCS call). The HA loop arms it with the instant its
//!   lease might expire, minus a margin, and pushes it forward on every confirmed renewal.
//! - An exit we did not ask for is reported as a crash and wakes the HA loop at once.
//! - The callbacks (`postgresql.callbacks`) are called from here, where starts, stops and
//!   reloads happen, as Patroni calls them from its `Postgresql` class: `on_start` (or
//!   `on_restart` after [`Supervisor::stop_for_restart`]) when postgres first accepts
//!   connections, `on_role_change` instead when it comes up in another role than it last ran
//!   in (a demoted primary back as a replica), `on_stop` after a stop we ordered (with the role
//!   `demoted` for [`Supervisor::demote`] of a primary), `on_reload` after a reload, and
//!   `on_role_change` with `primary` when told of a promotion ([`Supervisor::promoted`]).
//!   None of them is waited for ([`super::callbacks`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::{debug, error, info, warn};

use super::callbacks::{CallbackAction, CallbackRole, Callbacks};

/// How to stop postgres (`pg_ctl stop -m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGTERM: wait for clients to disconnect.
    Smart,
    /// SIGINT: disconnect clients, checkpoint, stop.
    Fast,
    /// SIGQUIT: stop at once; crash recovery on next start.
    Immediate,
}

/// `postmaster.pid` status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidfileStatus {
    Starting,
    /// Accepting read-write connections.
    Ready,
    /// Hot standby accepting read-only connections.
    Standby,
    Stopping,
    Unknown,
}

/// The postmaster as the supervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Postmaster {
    NotRunning,
    Running {
        pid: u32,
        since: Instant,
        status: PidfileStatus,
    },
    /// Exited without being asked to: a crash.
    Crashed {
        at: Instant,
        exit: String,
    },
    /// Start failed (spawn error).
    StartFailed {
        reason: String,
    },
}

impl Postmaster {
    pub fn is_running(&self) -> bool {
        matches!(self, Postmaster::Running { .. })
    }

    pub fn accepts_connections(&self) -> bool {
        matches!(
            self,
            Postmaster::Running {
                status: PidfileStatus::Ready | PidfileStatus::Standby,
                ..
            }
        )
    }
}

/// Settings of the supervised postgres.
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    /// Resolved at each start: an upgraded data directory starts on its version's binaries.
    pub bin_dirs: crate::config::BinDirs,
    pub data_dir: PathBuf,
    /// Stop postgres when the agent dies (parent-death signal).
    pub stop_with_agent: bool,
    /// The out-of-process fence (see [`super::fence_guard`]); `None` disables it.
    pub guard: Option<std::sync::Arc<super::fence_guard::FenceGuard>>,
    /// The user's callbacks (none configured: nothing runs).
    pub callbacks: Callbacks,
}

/// Errors the supervisor reports to callers.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("postgres is already running")]
    AlreadyRunning,
    #[error("cannot start postgres")]
    Spawn(#[source] std::io::Error),
    #[error("postgres did not stop within {0:?}, even after SIGKILL")]
    StopTimeout(Duration),
    #[error("the supervisor task has ended")]
    Gone,
    /// A reload was asked for while no postmaster runs.
    #[error("postgres is not running")]
    NotRunning,
    /// The postmaster could not be signalled.
    #[error("cannot signal postgres")]
    Signal(#[source] nix::errno::Errno),
}

/// Why postgres is stopped: decides the callback that follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopPurpose {
    /// `on_stop` with the current role.
    Stop,
    /// No `on_stop`; the next start reports `on_restart`.
    Restart,
    /// `on_stop` with the role `demoted` if postgres ran as a primary.
    Demote,
}

enum Command_ {
    Start {
        reply: oneshot::Sender<Result<(), SupervisorError>>,
    },
    Stop {
        mode: StopMode,
        timeout: Duration,
        purpose: StopPurpose,
        reply: oneshot::Sender<Result<(), SupervisorError>>,
    },
    Fence(Option<Instant>),
    Reload {
        reply: oneshot::Sender<Result<(), SupervisorError>>,
    },
    Promoted,
    /// This member holds the lock of a standby cluster (or no longer does).
    StandbyLeader(bool),
}

/// Handle to the supervisor task.
#[derive(Clone)]
pub struct Supervisor {
    commands: mpsc::Sender<Command_>,
    state: watch::Receiver<Postmaster>,
}

impl Supervisor {
    /// Starts the supervisor task. `changed` is notified on every state change (crash, ready).
    pub fn spawn(
        settings: SupervisorSettings,
        changed: std::sync::Arc<Notify>,
    ) -> (Supervisor, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(16);
        let (state_tx, state_rx) = watch::channel(Postmaster::NotRunning);
        let task = tokio::spawn(
            Actor {
                settings,
                child: None,
                state: state_tx,
                changed,
                stopping: None,
                fence: None,
                role: None,
                pending: None,
                restart_next: false,
                standby_leader: false,
            }
            .run(rx),
        );
        (
            Supervisor {
                commands: tx,
                state: state_rx,
            },
            task,
        )
    }

    pub fn state(&self) -> Postmaster {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Postmaster> {
        self.state.clone()
    }

    /// Spawns the postmaster; returns once the process exists (not when it is ready).
    pub async fn start(&self) -> Result<(), SupervisorError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command_::Start { reply })
            .await
            .map_err(|_| SupervisorError::Gone)?;
        rx.await.map_err(|_| SupervisorError::Gone)?
    }

    /// Stops the postmaster and waits for it to exit. Escalates to immediate after `timeout`,
    /// then to SIGKILL.
    pub async fn stop(&self, mode: StopMode, timeout: Duration) -> Result<(), SupervisorError> {
        self.stop_for(mode, timeout, StopPurpose::Stop).await
    }

    /// [`Self::stop`] as the first half of a restart: no `on_stop`, and the next start that
    /// reaches readiness in the same role calls `on_restart` instead of `on_start`.
    pub async fn stop_for_restart(
        &self,
        mode: StopMode,
        timeout: Duration,
    ) -> Result<(), SupervisorError> {
        self.stop_for(mode, timeout, StopPurpose::Restart).await
    }

    /// [`Self::stop`] of a member that must not stay primary: `on_stop` gets the role
    /// `demoted` (Patroni's role during a demotion), and the next start as a replica
    /// calls `on_role_change`.
    pub async fn demote(&self, mode: StopMode, timeout: Duration) -> Result<(), SupervisorError> {
        self.stop_for(mode, timeout, StopPurpose::Demote).await
    }

    async fn stop_for(
        &self,
        mode: StopMode,
        timeout: Duration,
        purpose: StopPurpose,
    ) -> Result<(), SupervisorError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command_::Stop {
                mode,
                timeout,
                purpose,
                reply,
            })
            .await
            .map_err(|_| SupervisorError::Gone)?;
        rx.await.map_err(|_| SupervisorError::Gone)?
    }

    /// Makes the postmaster re-read its configuration files (SIGHUP, as `pg_ctl reload`),
    /// then calls `on_reload`.
    pub async fn reload(&self) -> Result<(), SupervisorError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command_::Reload { reply })
            .await
            .map_err(|_| SupervisorError::Gone)?;
        rx.await.map_err(|_| SupervisorError::Gone)?
    }

    /// Postgres was asked to promote: it runs as a primary from now on; calls
    /// `on_role_change` with `primary` at once, as Patroni does right after `pg_ctl promote`.
    pub async fn promoted(&self) {
        if self.commands.send(Command_::Promoted).await.is_err() {
            debug!("the supervisor task has ended; promotion not recorded");
        }
    }

    /// This member became (`true`) or stopped being the standby leader of a standby cluster:
    /// a running standby reports `on_role_change` with `standby_leader` (or `replica`), as
    /// Patroni does, and later callbacks name that role.
    pub async fn set_standby_leader(&self, standby_leader: bool) {
        if self
            .commands
            .send(Command_::StandbyLeader(standby_leader))
            .await
            .is_err()
        {
            debug!("the supervisor task has ended; standby leader role not recorded");
        }
    }

    /// Arms (`Some`) or disarms (`None`) the fence.
    pub fn set_fence(&self, deadline: Option<Instant>) {
        // A full queue means commands are piling up; the fence matters more, so wait briefly.
        if let Err(e) = self.commands.try_send(Command_::Fence(deadline)) {
            warn!(error = %e, "could not update the fence deadline");
        }
    }

    /// Waits until postgres accepts connections, exits, or `timeout` passes.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.state.clone();
        let wait = async move {
            rx.wait_for(|s| s.accepts_connections() || !s.is_running())
                .await
                .map(|s| s.accepts_connections())
                .unwrap_or(false)
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }
}

struct Stopping {
    mode: StopMode,
    purpose: StopPurpose,
    escalate_at: Instant,
    waiters: Vec<oneshot::Sender<Result<(), SupervisorError>>>,
}

struct Actor {
    settings: SupervisorSettings,
    child: Option<Child>,
    state: watch::Sender<Postmaster>,
    changed: std::sync::Arc<Notify>,
    stopping: Option<Stopping>,
    fence: Option<Instant>,
    /// The role postgres last ran in (as last seen ready or told), for the callbacks.
    role: Option<CallbackRole>,
    /// The callback to call when the starting postgres becomes ready.
    pending: Option<CallbackAction>,
    /// The last stop was the first half of a restart.
    restart_next: bool,
    /// Holds the lock of a standby cluster: a standby runs as `standby_leader`.
    standby_leader: bool,
}

/// The callback owed when postgres, started with `pending` owed, accepts connections in
/// role `now` after it last ran in `before`. Patroni's `follow`: coming back in another role
/// (a demoted primary as a replica) is a role change, reported instead of the start or
/// restart.
fn ready_callback(
    before: Option<CallbackRole>,
    now: CallbackRole,
    pending: CallbackAction,
) -> CallbackAction {
    match before {
        Some(before) if before != now => CallbackAction::OnRoleChange,
        _ => pending,
    }
}

/// Reads the status line (line 8) of `postmaster.pid`.
pub fn read_pidfile_status(data_dir: &Path) -> PidfileStatus {
    let Ok(text) = std::fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return PidfileStatus::Unknown;
    };
    status_line(&text)
}

fn status_line(text: &str) -> PidfileStatus {
    match text.lines().nth(7).map(str::trim) {
        Some("ready") => PidfileStatus::Ready,
        Some("standby") => PidfileStatus::Standby,
        Some("starting") => PidfileStatus::Starting,
        Some("stopping") => PidfileStatus::Stopping,
        _ => PidfileStatus::Unknown,
    }
}

/// The status line of `postmaster.pid` if the file is that of postmaster `pid`, else
/// `Unknown`. Until a new postmaster has replaced it, the file is its killed predecessor's, with
/// whatever status that one last wrote: a "stopping" read there (a postmaster killed during its
/// shutdown) ended the polling, and the agent waited for a start that had long finished (fault
/// campaign, seed 20261297).
pub fn read_pidfile_status_of(data_dir: &Path, pid: u32) -> PidfileStatus {
    let Ok(text) = std::fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return PidfileStatus::Unknown;
    };
    if text.lines().next().map(str::trim) != Some(pid.to_string().as_str()) {
        return PidfileStatus::Unknown;
    }
    status_line(&text)
}

/// The PID in `postmaster.pid`, if that process is alive.
// A zombie (exited, not reaped) counts as live on purpose: postgres' own lock-file check does
// the same (`kill(pid, 0)`), so single-user mode and pg_rewind refuse the directory until the
// zombie is reaped; treating it as gone made a rewind after a kill -9 fail for good (CI).
pub fn live_postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    alive.then_some(pid)
}

fn signal_for(mode: StopMode) -> nix::sys::signal::Signal {
    use nix::sys::signal::Signal;
    match mode {
        StopMode::Smart => Signal::SIGTERM,
        StopMode::Fast => Signal::SIGINT,
        StopMode::Immediate => Signal::SIGQUIT,
    }
}

impl Actor {
    fn set(&self, state: Postmaster) {
        self.state.send_replace(state);
        self.changed.notify_one();
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
            if let Err(e) = nix::sys::signal::kill(pid, sig) {
                warn!(error = %e, signal = %sig, "cannot signal postgres");
            }
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command_>) {
        let mut ready_poll = tokio::time::interval(Duration::from_millis(50));
        loop {
            let fence = self.fence.filter(|_| self.child.is_some());
            let escalate = self.stopping.as_ref().map(|s| s.escalate_at);
            let polling = matches!(
                *self.state.borrow(),
                Postmaster::Running {
                    status: PidfileStatus::Starting | PidfileStatus::Unknown,
                    ..
                }
            );
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => {
                        // The agent is going away; never leave postgres without a supervisor.
                        if self.child.is_some() {
                            self.signal(signal_for(StopMode::Immediate));
                        }
                        return;
                    }
                },
                status = async { self.child.as_mut().map(|c| c.wait()).expect("guarded").await }, if self.child.is_some() => {
                    self.child = None;
                    self.sync_guard();
                    let exit = match status {
                        Ok(s) => s.to_string(),
                        Err(e) => format!("wait failed: {e}"),
                    };
                    match self.stopping.take() {
                        Some(stopping) => {
                            info!(%exit, "postgres stopped");
                            self.after_stop(stopping.purpose);
                            self.set(Postmaster::NotRunning);
                            for w in stopping.waiters {
                                let _ = w.send(Ok(()));
                            }
                        }
                        None => {
                            error!(%exit, "postgres exited unexpectedly");
                            self.set(Postmaster::Crashed { at: Instant::now(), exit });
                        }
                    }
                }
                _ = tokio::time::sleep_until(fence.unwrap_or_else(Instant::now).into()), if fence.is_some() => {
                    error!("fencing: the leader lease could not be confirmed in time; stopping postgres immediately so it cannot accept writes after the lease may have expired");
                    self.fence = None;
                    self.begin_stop(StopMode::Immediate, Duration::from_secs(5), StopPurpose::Demote, None);
                }
                _ = tokio::time::sleep_until(escalate.unwrap_or_else(Instant::now).into()), if escalate.is_some() => {
                    self.escalate();
                }
                _ = ready_poll.tick(), if polling => {
                    let current = self.state.borrow().clone();
                    if let Postmaster::Running { pid, since, status: old } = current {
                        let status = read_pidfile_status_of(&self.settings.data_dir, pid);
                        if status != old && status != PidfileStatus::Unknown {
                            self.set(Postmaster::Running { pid, since, status });
                            self.after_ready(status);
                        }
                    }
                }
            }
        }
    }

    fn handle(&mut self, cmd: Command_) {
        match cmd {
            Command_::Start { reply } => {
                let _ = reply.send(self.start());
            }
            Command_::Stop {
                mode,
                timeout,
                purpose,
                reply,
            } => {
                if self.child.is_none() {
                    let _ = reply.send(Ok(()));
                    let stale = !matches!(*self.state.borrow(), Postmaster::NotRunning);
                    if stale {
                        self.set(Postmaster::NotRunning);
                    }
                } else {
                    self.begin_stop(mode, timeout, purpose, Some(reply));
                }
            }
            Command_::Fence(deadline) => {
                self.fence = deadline;
                self.sync_guard();
            }
            Command_::Reload { reply } => {
                let result = self.reload();
                let _ = reply.send(result);
            }
            Command_::Promoted => {
                // Promotion is requested again while a first request is still in progress;
                // Patroni's `promote` returns early then too.
                if self.role.replace(CallbackRole::Primary) == Some(CallbackRole::Primary) {
                    return;
                }
                self.settings
                    .callbacks
                    .call(CallbackAction::OnRoleChange, CallbackRole::Primary);
            }
            Command_::StandbyLeader(standby_leader) => {
                self.standby_leader = standby_leader;
                // Only a running standby changes role here; one not ready yet gets its role
                // when it is (`after_ready`).
                if let Some(before @ (CallbackRole::Replica | CallbackRole::StandbyLeader)) =
                    self.role
                {
                    let now = self.standby_role();
                    if now != before && self.pending.is_none() {
                        self.role = Some(now);
                        self.settings
                            .callbacks
                            .call(CallbackAction::OnRoleChange, now);
                    }
                }
            }
        }
    }

    fn standby_role(&self) -> CallbackRole {
        if self.standby_leader {
            CallbackRole::StandbyLeader
        } else {
            CallbackRole::Replica
        }
    }

    fn reload(&self) -> Result<(), SupervisorError> {
        let Some(pid) = self.child.as_ref().and_then(Child::id) else {
            return Err(SupervisorError::NotRunning);
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)
            .map_err(SupervisorError::Signal)?;
        if let Some(role) = self.role {
            self.settings.callbacks.call(CallbackAction::OnReload, role);
        }
        Ok(())
    }

    /// Postgres accepts connections for the first time since it was started.
    fn after_ready(&mut self, status: PidfileStatus) {
        if !matches!(status, PidfileStatus::Ready | PidfileStatus::Standby) {
            return;
        }
        // A hot standby writes `ready` too: the role is told by `standby.signal`, which we
        // write for a replica and postgres removes when it promotes.
        let role = if self.settings.data_dir.join("standby.signal").exists() {
            self.standby_role()
        } else {
            CallbackRole::Primary
        };
        let Some(pending) = self.pending.take() else {
            return;
        };
        let action = ready_callback(self.role, role, pending);
        self.role = Some(role);
        self.settings.callbacks.call(action, role);
    }

    /// Postgres exited after we asked it to.
    fn after_stop(&mut self, purpose: StopPurpose) {
        // Not yet ready (a start that failed, a restart's stop): no start callback is owed.
        let was_ready = self.pending.take().is_none();
        match purpose {
            StopPurpose::Restart => self.restart_next = true,
            StopPurpose::Stop | StopPurpose::Demote => {
                let demoted =
                    purpose == StopPurpose::Demote && self.role == Some(CallbackRole::Primary);
                if demoted {
                    self.role = Some(CallbackRole::Demoted);
                }
                if let (true, Some(role)) = (was_ready, self.role) {
                    self.settings.callbacks.call(CallbackAction::OnStop, role);
                }
            }
        }
    }

    /// Mirrors the fence to the guard process, which acts even if this process is frozen.
    fn sync_guard(&self) {
        let Some(guard) = &self.settings.guard else {
            return;
        };
        match (self.fence, self.child.as_ref().and_then(Child::id)) {
            (Some(deadline), Some(pid)) => guard.arm(deadline, pid),
            _ => guard.disarm(),
        }
    }

    fn begin_stop(
        &mut self,
        mode: StopMode,
        timeout: Duration,
        purpose: StopPurpose,
        reply: Option<oneshot::Sender<Result<(), SupervisorError>>>,
    ) {
        let stopping = self.stopping.get_or_insert(Stopping {
            mode,
            purpose,
            escalate_at: Instant::now() + timeout,
            waiters: Vec::new(),
        });
        // A more forceful request overrides a gentler one in progress.
        if mode as u8 >= stopping.mode as u8 {
            stopping.mode = mode;
            stopping.escalate_at = stopping.escalate_at.min(Instant::now() + timeout);
        }
        // A plain stop or a demotion asked for during a restart's stop ends the restart.
        if purpose != StopPurpose::Restart {
            stopping.purpose = purpose;
        }
        stopping.waiters.extend(reply);
        let current = self.state.borrow().clone();
        if let Postmaster::Running { pid, since, .. } = current {
            self.state.send_replace(Postmaster::Running {
                pid,
                since,
                status: PidfileStatus::Stopping,
            });
        }
        self.signal(signal_for(mode));
    }

    fn escalate(&mut self) {
        let Some(stopping) = self.stopping.as_mut() else {
            return;
        };
        match stopping.mode {
            StopMode::Smart | StopMode::Fast => {
                warn!("postgres did not stop in time; escalating to immediate shutdown");
                stopping.mode = StopMode::Immediate;
                stopping.escalate_at = Instant::now() + Duration::from_secs(5);
                self.signal(signal_for(StopMode::Immediate));
            }
            StopMode::Immediate => {
                error!("postgres ignored immediate shutdown; sending SIGKILL");
                stopping.escalate_at = Instant::now() + Duration::from_secs(3600);
                self.signal(nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    fn start(&mut self) -> Result<(), SupervisorError> {
        if self.child.is_some() {
            return Err(SupervisorError::AlreadyRunning);
        }
        let bin_dir = self.settings.bin_dirs.for_data_dir(&self.settings.data_dir);
        let mut cmd = Command::new(bin_dir.join("postgres"));
        cmd.arg("-D")
            .arg(&self.settings.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        if self.settings.stop_with_agent {
            set_parent_death_signal(&mut cmd);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let reason = format!("cannot run postgres: {e}");
                self.set(Postmaster::StartFailed { reason });
                return Err(SupervisorError::Spawn(e));
            }
        };
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(out));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(err));
        }
        let pid = child.id().unwrap_or_default();
        info!(pid, "postgres started");
        self.child = Some(child);
        self.stopping = None;
        self.pending = Some(if std::mem::take(&mut self.restart_next) {
            CallbackAction::OnRestart
        } else {
            CallbackAction::OnStart
        });
        self.sync_guard();
        self.set(Postmaster::Running {
            pid,
            since: Instant::now(),
            status: PidfileStatus::Starting,
        });
        Ok(())
    }
}

/// Folds postgres' own log lines into ours.
async fn forward_lines<R: tokio::io::AsyncRead + Unpin>(reader: R) {
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        // Postgres retries a failing archive_command every few seconds: 816 lines a minute
        // during a repository outage. The backup service logs one WARN per change of state
        // (from pg_stat_archiver) instead.
        if line.contains("archive command failed")
            || line.contains("The failed archive command was")
        {
            debug!(target: "postgres", "{line}");
        } else {
            info!(target: "postgres", "{line}");
        }
    }
}

#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only calls async-signal-safe
    // functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGQUIT)
                .map_err(std::io::Error::from)?;
            // The agent may have died between fork and prctl: then nobody would signal us.
            if nix::unistd::getppid() != parent {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod pidfile_tests {
    use super::*;

    fn pidfile(pid: u32, status: &str) -> String {
        format!("{pid}\n/data\n1700000000\n5432\n/tmp\n127.0.0.1\n  5432001  0\n{status}\n")
    }

    #[test]
    fn a_predecessors_pidfile_says_nothing_about_the_new_postmaster() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("postmaster.pid");
        std::fs::write(&path, pidfile(100, "stopping")).expect("write");
        assert_eq!(
            read_pidfile_status_of(dir.path(), 200),
            PidfileStatus::Unknown
        );
        assert_eq!(
            read_pidfile_status_of(dir.path(), 100),
            PidfileStatus::Stopping
        );
        std::fs::write(&path, pidfile(200, "ready")).expect("write");
        assert_eq!(
            read_pidfile_status_of(dir.path(), 200),
            PidfileStatus::Ready
        );
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(
            read_pidfile_status_of(dir.path(), 200),
            PidfileStatus::Unknown
        );
    }
}

#[cfg(test)]
mod callback_tests {
    use super::*;
    use CallbackAction::{OnRestart, OnRoleChange, OnStart};
    use CallbackRole::{Demoted, Primary, Replica};

    /// Patroni's `Postgresql.follow` (`change_role`) and `check_startup_state_changed`
    /// (`__cb_pending or ON_START`).
    #[test]
    fn the_start_callback_is_a_role_change_only_in_another_role() {
        // First start of the agent's life, a crash restart, a restart in the same role.
        assert_eq!(ready_callback(None, Replica, OnStart), OnStart);
        assert_eq!(ready_callback(None, Primary, OnStart), OnStart);
        assert_eq!(ready_callback(Some(Replica), Replica, OnStart), OnStart);
        assert_eq!(ready_callback(Some(Primary), Primary, OnRestart), OnRestart);
        // A demoted primary back as a replica, restarted or not.
        assert_eq!(
            ready_callback(Some(Demoted), Replica, OnStart),
            OnRoleChange
        );
        assert_eq!(
            ready_callback(Some(Primary), Replica, OnRestart),
            OnRoleChange
        );
        // A crashed primary that lost its lock meanwhile.
        assert_eq!(
            ready_callback(Some(Primary), Replica, OnStart),
            OnRoleChange
        );
    }
}
