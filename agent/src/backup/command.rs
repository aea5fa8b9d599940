//! Running pgBackRest as the agent's child: in its own process group, its output folded into
//! the agent's log with the command and stanza as context, bounded by a timeout, and killed
//! with its whole group when the timeout passes, the caller cancels, or the agent dies.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How a pgBackRest command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The executable could not be started (missing, not executable).
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// It ran and exited non-zero; `output` holds its last lines (pgBackRest's error message).
    #[error("pgbackrest {what} failed (exit code {code:?}): {output}")]
    Failed {
        what: String,
        code: Option<i32>,
        output: String,
    },
    /// It ran longer than allowed and was killed with its process group.
    #[error("pgbackrest {what} did not finish within {timeout:?} and was killed")]
    TimedOut { what: String, timeout: Duration },
    /// The caller gave up (lost leadership, switchover, shutdown); the group was killed.
    #[error("pgbackrest {what} was cancelled: {why}")]
    Cancelled { what: String, why: String },
}

impl CommandError {
    /// A short label for metrics and the status report.
    pub fn kind(&self) -> &'static str {
        match self {
            CommandError::Spawn { .. } => "spawn",
            CommandError::Failed { .. } => "failed",
            CommandError::TimedOut { .. } => "timeout",
            CommandError::Cancelled { .. } => "cancelled",
        }
    }
}

/// What every invocation shares.
#[derive(Debug, Clone)]
pub struct Runner {
    pub command: PathBuf,
    pub config_file: PathBuf,
    /// The agent's password file (0600, with the superuser's line) for pgBackRest's libpq
    /// connection (backup, check): passed as `PGPASSFILE`, never the password itself, which
    /// any process of the same user could read from the environment.
    pub pgpass: Option<crate::postgres::replica::Pgpass>,
    pub timeout: Duration,
}

/// One invocation.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    /// The pgBackRest command (`backup`, `check`, …), for logs and errors.
    pub what: &'a str,
    pub stanza: &'a str,
    /// Arguments after the command name.
    pub args: Vec<String>,
    /// Fold stdout into the log at INFO (progress of long commands); otherwise DEBUG.
    pub loud: bool,
    /// Capture stdout instead of logging it (`info --output=json`).
    pub capture: bool,
}

/// Lines kept for the error message.
const TAIL: usize = 8;

impl Runner {
    /// What every pgBackRest child gets: output piped into our log, its own process group
    /// (killed as a whole), death with the agent, a fixed locale and the libpq password file.
    pub(crate) fn supervise(&self, cmd: &mut Command) {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .env("LC_ALL", "C");
        cmd.env_remove("PGPASSWORD");
        if let Some(pgpass) = &self.pgpass {
            match pgpass.write() {
                Ok(()) => {
                    cmd.env("PGPASSFILE", &pgpass.path);
                }
                Err(e) => warn!(
                    path = %pgpass.path.display(),
                    error = %e,
                    "cannot write the password file for pgbackrest"
                ),
            }
        }
        set_parent_death_signal(cmd);
    }

    /// `pgbackrest info --output=json` of `stanza`, within `timeout`: the JSON text.
    pub async fn info_json(&self, stanza: &str, timeout: Duration) -> Result<String, CommandError> {
        let runner = Runner {
            timeout,
            ..self.clone()
        };
        runner
            .run(
                Invocation {
                    what: "info",
                    stanza,
                    args: vec!["--output=json".into()],
                    loud: false,
                    capture: true,
                },
                &CancellationToken::new(),
            )
            .await
    }

    /// Runs one command to completion; returns its stdout when `capture` was asked.
    pub async fn run(
        &self,
        inv: Invocation<'_>,
        cancel: &CancellationToken,
    ) -> Result<String, CommandError> {
        let mut cmd = Command::new(&self.command);
        cmd.arg(format!("--config={}", self.config_file.display()))
            .arg(format!("--stanza={}", inv.stanza));
        if !inv.capture {
            cmd.arg("--log-level-console=info");
        }
        cmd.arg(inv.what).args(&inv.args);
        self.supervise(&mut cmd);
        debug!(command = inv.what, stanza = inv.stanza, args = ?inv.args, "running pgbackrest");
        let mut child = cmd.spawn().map_err(|source| CommandError::Spawn {
            command: self.command.display().to_string(),
            source,
        })?;
        let pgid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let what = inv.what.to_owned();
        let stanza = inv.stanza.to_owned();
        let out_task = tokio::spawn(collect(
            stdout,
            what.clone(),
            stanza.clone(),
            inv.loud,
            inv.capture,
        ));
        let err_task = tokio::spawn(collect(stderr, what.clone(), stanza.clone(), true, false));
        let outcome = tokio::select! {
            status = child.wait() => Ok(status),
            _ = tokio::time::sleep(self.timeout) => Err(CommandError::TimedOut { what: what.clone(), timeout: self.timeout }),
            _ = cancel.cancelled() => Err(CommandError::Cancelled { what: what.clone(), why: "stopped by the agent".into() }),
        };
        let status = match outcome {
            Ok(status) => status,
            Err(e) => {
                warn!(command = %what, %stanza, error = %e, "killing pgbackrest and its process group");
                kill_group(pgid, &mut child).await;
                return Err(e);
            }
        };
        let (captured, out_tail) = out_task.await.unwrap_or_default();
        let (_, err_tail) = err_task.await.unwrap_or_default();
        match status {
            Ok(s) if s.success() => Ok(captured),
            Ok(s) => {
                let mut lines: Vec<String> = out_tail.into_iter().chain(err_tail).collect();
                // pgBackRest's error line is the informative one; keep it and what follows.
                if let Some(pos) = lines.iter().position(|l| l.contains("ERROR:")) {
                    lines.drain(..pos);
                }
                Err(CommandError::Failed {
                    what,
                    code: s.code(),
                    output: lines.join(" | "),
                })
            }
            Err(source) => Err(CommandError::Spawn {
                command: self.command.display().to_string(),
                source,
            }),
        }
    }
}

/// SIGTERM to the group (pgBackRest stops its workers and removes its locks), SIGKILL after
/// 10 s.
pub(super) async fn kill_group(pgid: Option<nix::unistd::Pid>, child: &mut tokio::process::Child) {
    use nix::sys::signal::{killpg, Signal};
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_ok()
        {
            // The leader exited; workers that ignored SIGTERM still go.
            let _ = killpg(pgid, Signal::SIGKILL);
            return;
        }
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    let _ = child.kill().await;
}

/// Reads lines: logs them with context, keeps the last few, and the whole text if `capture`.
pub(super) async fn collect<R: AsyncRead + Unpin>(
    reader: Option<R>,
    what: String,
    stanza: String,
    loud: bool,
    capture: bool,
) -> (String, VecDeque<String>) {
    let mut captured = String::new();
    let mut tail = VecDeque::new();
    let Some(reader) = reader else {
        return (captured, tail);
    };
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if capture {
            captured.push_str(&line);
            captured.push('\n');
            continue;
        }
        if line.contains("ERROR:") || line.contains("WARN:") {
            warn!(target: "pgbackrest", command = %what, %stanza, "{line}");
        } else if loud {
            info!(target: "pgbackrest", command = %what, %stanza, "{line}");
        } else {
            debug!(target: "pgbackrest", command = %what, %stanza, "{line}");
        }
        if tail.len() == TAIL {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    (captured, tail)
}

#[allow(unsafe_code)]
pub(super) fn set_parent_death_signal(cmd: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only calls async-signal-safe
    // functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
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
mod tests {
    use super::*;

    fn runner(script: &str, timeout: Duration) -> (tempfile::TempDir, Runner) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fake-pgbackrest");
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let runner = Runner {
            command: path,
            config_file: dir.path().join("c.conf"),
            pgpass: None,
            timeout,
        };
        (dir, runner)
    }

    fn inv(capture: bool) -> Invocation<'static> {
        Invocation {
            what: "check",
            stanza: "s",
            args: vec![],
            loud: false,
            capture,
        }
    }

    #[tokio::test]
    async fn a_failure_reports_the_error_line_and_exit_code() {
        let (_d, r) = runner(
            "echo 'P00   INFO: check command begin'; echo 'P00  ERROR: [041]: unable to open missing file' >&2; exit 41",
            Duration::from_secs(10),
        );
        let e = r
            .run(inv(false), &CancellationToken::new())
            .await
            .expect_err("fails");
        let text = e.to_string();
        assert!(text.contains("exit code Some(41)"), "{text}");
        assert!(text.contains("unable to open missing file"), "{text}");
        assert!(!text.contains("command begin"), "{text}");
    }

    /// Issue 17: pgBackRest finds the superuser's password in the agent's 0600 password file
    /// (`PGPASSFILE`); no `PGPASSWORD` in its environment, where processes of the same user
    /// could read it.
    #[tokio::test]
    async fn pgbackrest_gets_the_password_file_not_the_password() {
        let (dir, mut r) = runner("env", Duration::from_secs(10));
        let mut config = crate::config::Config::default();
        config.postgresql.pgpass = Some(dir.path().join("pgpass"));
        config.pgbackrest = Some(Default::default());
        let auth = &mut config.postgresql.authentication;
        auth.superuser.username = "postgres".into();
        auth.superuser.password = Some("su-pw-42".into());
        auth.rewind = Some(crate::config::Credentials {
            username: "rewinder".into(),
            password: Some("rw".into()),
            ..Default::default()
        });
        r.pgpass = crate::postgres::replica::pgpass(&config);
        let out = r
            .run(inv(true), &CancellationToken::new())
            .await
            .expect("runs");
        assert!(!out.contains("PGPASSWORD"), "{out}");
        assert!(!out.contains("su-pw-42"), "{out}");
        let file = dir.path().join("pgpass");
        assert!(
            out.lines()
                .any(|l| l == format!("PGPASSFILE={}", file.display())),
            "{out}"
        );
        let content = std::fs::read_to_string(&file).expect("written");
        assert!(content.contains("*:*:*:postgres:su-pw-42\n"), "{content}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn captured_stdout_is_returned_with_the_arguments_in_order() {
        let (_d, r) = runner("echo \"$@\"", Duration::from_secs(10));
        let out = r
            .run(inv(true), &CancellationToken::new())
            .await
            .expect("runs");
        assert!(out.trim().ends_with("--stanza=s check"), "{out}");
        assert!(out.starts_with("--config="), "{out}");
    }

    #[tokio::test]
    async fn a_hung_command_is_killed_with_its_process_group_at_the_timeout() {
        let (dir, r) = runner(
            "sleep 300 & echo $! > \"$(dirname \"$0\")/grandchild\"; wait",
            Duration::from_millis(500),
        );
        let e = r
            .run(inv(false), &CancellationToken::new())
            .await
            .expect_err("times out");
        assert!(matches!(e, CommandError::TimedOut { .. }), "{e}");
        let pid: i32 = std::fs::read_to_string(dir.path().join("grandchild"))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        // The grandchild got the group's signal too (it may linger as a zombie of init briefly).
        let alive = |pid: i32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
        };
        for _ in 0..50 {
            if !alive(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the grandchild {pid} survived the timeout");
    }
}
