//! `postgresql.callbacks`: the user's scripts run when postgres starts, stops, restarts, reloads
//! or changes role, as Patroni 4.1 runs them (`patroni/postgresql/callback_executor.py`).
//!
//! # Guarantees
//! - The command is the configured string split as a POSIX shell would (Patroni's
//!   `shlex.split`), followed by three arguments: the action (`on_start`, …), the role
//!   (`primary`, `replica`, `standby_leader`, `demoted`) and the scope.
//! - Never waits: a callback is spawned and reaped by a task of its own, so a slow script
//!   cannot delay the HA loop or the supervisor.
//! - One at a time: starting a callback kills the previous one if it still runs, with its whole
//!   process group (each callback leads a group of its own), as Patroni kills the process and
//!   its children. `on_reload` has a slot of its own, as Patroni's `OnReloadExecutor`: it only
//!   replaces an earlier `on_reload`.
//! - A callback that has exited is never signalled: its leftover children keep running, as in
//!   Patroni, and a recycled process id cannot be hit.
//! - The commands can be replaced at any time ([`Callbacks::set_commands`], on reload).
//! - A callback gets the agent's environment without the variables that hold a password.

use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tracing::{info, warn};

use crate::config::CallbacksConfig;

/// Why a callback runs (Patroni's `CallbackAction`; the first of the three arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackAction {
    OnStart,
    OnStop,
    OnRestart,
    OnReload,
    OnRoleChange,
}

impl CallbackAction {
    pub fn as_str(self) -> &'static str {
        match self {
            CallbackAction::OnStart => "on_start",
            CallbackAction::OnStop => "on_stop",
            CallbackAction::OnRestart => "on_restart",
            CallbackAction::OnReload => "on_reload",
            CallbackAction::OnRoleChange => "on_role_change",
        }
    }
}

/// The role passed to a callback: Patroni's `PostgresqlRole` values (`promoted` is passed as
/// `primary`, as Patroni does; Patroni 4 never passes `master`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackRole {
    Primary,
    Replica,
    StandbyLeader,
    /// A primary that was stopped to become a replica (Patroni's role during a demotion).
    Demoted,
}

impl CallbackRole {
    pub fn as_str(self) -> &'static str {
        match self {
            CallbackRole::Primary => "primary",
            CallbackRole::Replica => "replica",
            CallbackRole::StandbyLeader => "standby_leader",
            CallbackRole::Demoted => "demoted",
        }
    }
}

/// A running callback: the leader of its process group until its exit has been seen.
struct Running {
    /// Distinguishes this run from later ones in the same slot.
    serial: u64,
    pid: i32,
    argv: Vec<String>,
}

#[derive(Default)]
struct Slots {
    commands: CallbacksConfig,
    serial: u64,
    /// `on_start`, `on_stop`, `on_restart`, `on_role_change`.
    main: Option<Running>,
    /// `on_reload`.
    reload: Option<Running>,
}

/// Runs the configured callbacks. Cheap to clone; every clone shares the slots.
#[derive(Clone, Default)]
pub struct Callbacks {
    scope: Arc<str>,
    slots: Arc<Mutex<Slots>>,
}

impl std::fmt::Debug for Callbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callbacks")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl Callbacks {
    pub fn new(scope: &str, commands: CallbacksConfig) -> Self {
        Callbacks {
            scope: scope.into(),
            slots: Arc::new(Mutex::new(Slots {
                commands,
                ..Slots::default()
            })),
        }
    }

    /// Replaces the commands (a reloaded configuration); a callback already running goes on.
    pub fn set_commands(&self, commands: CallbacksConfig) {
        let mut slots = self.lock();
        if slots.commands != commands {
            info!("callbacks changed");
            slots.commands = commands;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the callback for `action` if one is configured, after killing the one still
    /// running in the same slot. Returns at once; must be called inside the Tokio runtime.
    pub fn call(&self, action: CallbackAction, role: CallbackRole) {
        let mut slots = self.lock();
        let Some(command) = slots.commands.command(action).map(str::to_owned) else {
            return;
        };
        let Some(argv) = argv(&command, action, role, &self.scope) else {
            // Validation refuses such a command; a reload cannot bring one in either.
            warn!(
                action = action.as_str(),
                "callback not run: its command cannot be split into words"
            );
            return;
        };
        slots.serial += 1;
        let serial = slots.serial;
        let slot = match action {
            CallbackAction::OnReload => &mut slots.reload,
            _ => &mut slots.main,
        };
        if let Some(previous) = slot.take() {
            kill_group(&previous);
        }
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group: the whole script (a shell and what it runs) can be killed at once,
            // and a Ctrl-C meant for the agent does not reach it.
            .process_group(0)
            .kill_on_drop(false);
        // The agent's environment may carry passwords (`PATRONI_SUPERUSER_PASSWORD`,
        // `PGPASSWORD`, …); a script for a VIP or DNS has no use for them.
        for (name, _) in std::env::vars_os() {
            if is_secret_variable(&name.to_string_lossy()) {
                cmd.env_remove(&name);
            }
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                warn!(error = %e, ?argv, "cannot run the callback");
                return;
            }
        };
        let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
            return;
        };
        info!(?argv, pid, "callback started");
        *slot = Some(Running {
            serial,
            pid,
            argv: argv.clone(),
        });
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(out, action));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(err, action));
        }
        let this = self.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // Forget it before the zombie is gone for good: from here on its id may be reused.
            let mut slots = this.lock();
            let slot = match action {
                CallbackAction::OnReload => &mut slots.reload,
                _ => &mut slots.main,
            };
            if slot.as_ref().is_some_and(|r| r.serial == serial) {
                *slot = None;
            }
            drop(slots);
            match status {
                Ok(s) if s.success() => info!(action = action.as_str(), "callback finished"),
                Ok(s) => info!(action = action.as_str(), status = %s, "callback ended"),
                Err(e) => {
                    warn!(action = action.as_str(), error = %e, "cannot wait for the callback")
                }
            }
        });
    }
}

/// Kills a callback that still runs (its exit not yet reaped, so its id is still its own).
fn kill_group(running: &Running) {
    let group = nix::unistd::Pid::from_raw(running.pid);
    match nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL) {
        Ok(()) => warn!(argv = ?running.argv, "killed the callback because it was still running"),
        Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => warn!(argv = ?running.argv, error = %e, "cannot kill the previous callback"),
    }
}

/// An environment variable a callback does not get: one that holds a password.
fn is_secret_variable(name: &str) -> bool {
    name.to_ascii_uppercase().contains("PASSWORD")
}

/// The command line of a callback: the configured words, then action, role and scope.
pub fn argv(
    command: &str,
    action: CallbackAction,
    role: CallbackRole,
    scope: &str,
) -> Option<Vec<String>> {
    let mut words = shlex::split(command).filter(|w| !w.is_empty())?;
    words.extend([
        action.as_str().to_owned(),
        role.as_str().to_owned(),
        scope.to_owned(),
    ]);
    Some(words)
}

/// A callback's output, one log line per line.
async fn forward_lines<R: tokio::io::AsyncRead + Unpin>(reader: R, action: CallbackAction) {
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        info!(callback = action.as_str(), "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn argv_is_the_split_command_then_action_role_scope() {
        // Patroni: `shlex.split(cmd) + [cb_type, role, self.scope]`.
        let argv = argv(
            "/usr/local/bin/vip.sh --dev 'eth 0'",
            CallbackAction::OnRoleChange,
            CallbackRole::Primary,
            "batman",
        )
        .expect("splits");
        assert_eq!(
            argv,
            [
                "/usr/local/bin/vip.sh",
                "--dev",
                "eth 0",
                "on_role_change",
                "primary",
                "batman"
            ]
        );
        assert!(super::argv(
            "'unclosed",
            CallbackAction::OnStart,
            CallbackRole::Replica,
            "s"
        )
        .is_none());
        assert!(super::argv("  ", CallbackAction::OnStart, CallbackRole::Replica, "s").is_none());
    }

    #[test]
    fn passwords_in_the_environment_are_not_passed_on() {
        for name in [
            "PGPASSWORD",
            "PATRONI_SUPERUSER_PASSWORD",
            "PGWARDEN_REPLICATION_PASSWORD",
            "PATRONI_RESTAPI_PASSWORD",
        ] {
            assert!(is_secret_variable(name), "{name}");
        }
        for name in ["PATH", "HOME", "PATRONI_SCOPE", "PGPASSFILE"] {
            assert!(!is_secret_variable(name), "{name}");
        }
    }

    fn config(start: &str, reload: &str) -> CallbacksConfig {
        CallbacksConfig {
            on_start: Some(start.to_owned()),
            on_stop: Some(start.to_owned()),
            on_reload: Some(reload.to_owned()),
            ..CallbacksConfig::default()
        }
    }

    async fn wait_for(path: &std::path::Path, text: &str) -> String {
        for _ in 0..200 {
            let got = std::fs::read_to_string(path).unwrap_or_default();
            if got.contains(text) {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{text:?} never appeared in {}", path.display());
    }

    #[tokio::test]
    async fn a_new_callback_kills_the_running_one_but_not_a_reload() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let out = dir.path().join("out");
        let slow = format!(
            "sh -c 'echo begin \"$@\" >> {0}; sleep 30; echo end \"$@\" >> {0}' cb",
            out.display()
        );
        let callbacks = Callbacks::new("batman", config(&slow, &slow));
        callbacks.call(CallbackAction::OnStart, CallbackRole::Replica);
        callbacks.call(CallbackAction::OnReload, CallbackRole::Replica);
        wait_for(&out, "begin on_start replica batman").await;
        wait_for(&out, "begin on_reload replica batman").await;
        let reload_pid = callbacks
            .lock()
            .reload
            .as_ref()
            .expect("on_reload runs")
            .pid;
        let start_pid = callbacks.lock().main.as_ref().expect("a callback runs").pid;

        callbacks.call(CallbackAction::OnStop, CallbackRole::Replica);
        wait_for(&out, "begin on_stop replica batman").await;
        // The on_start shell and its `sleep` are gone; the on_reload one still runs.
        let alive = |pid: i32| nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), None);
        for _ in 0..100 {
            if alive(start_pid).is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(alive(start_pid).is_err(), "the on_start group still runs");
        assert!(alive(reload_pid).is_ok(), "on_reload was killed too");
        assert!(!std::fs::read_to_string(&out)
            .expect("the output")
            .contains("end"));

        callbacks.set_commands(CallbacksConfig::default());
        callbacks.call(CallbackAction::OnReload, CallbackRole::Replica);
        // No command any more: nothing runs, and the old one is left alone.
        assert!(alive(reload_pid).is_ok());
        for pid in [
            reload_pid,
            callbacks.lock().main.as_ref().expect("a callback runs").pid,
        ] {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    #[tokio::test]
    async fn a_finished_callback_is_forgotten() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let out = dir.path().join("out");
        let quick = format!("sh -c 'echo \"$@\" >> {}' cb", out.display());
        let callbacks = Callbacks::new("batman", config(&quick, &quick));
        callbacks.call(CallbackAction::OnStart, CallbackRole::Primary);
        wait_for(&out, "on_start primary batman").await;
        for _ in 0..200 {
            if callbacks.lock().main.is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the finished callback is still recorded as running");
    }
}
