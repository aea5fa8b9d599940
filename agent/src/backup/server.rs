//! `pgbackrest server`, pgBackRest's TLS server, as the agent's child when
//! `pgbackrest.tls_server` is set: the leader's backup from a standby reads this member's data
//! directory through it (see [`super::standby`]).
//!
//! Supervised like the other pgBackRest children: its own process group with
//! `PR_SET_PDEATHSIG`, its output folded into the agent's log (target `pgbackrest`, field
//! `command = server`), its group killed on shutdown. It is restarted when it exits, with a
//! backoff, because a member whose server is down silently stops being a usable standby.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::command::{collect, kill_group, CommandError, Runner};

/// First restart delay; doubled per quick exit up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A server that ran this long before exiting was healthy: restart it without delay growth.
const STABLE: Duration = Duration::from_secs(60);

/// Runs the server until `shutdown`, restarting it when it exits.
pub async fn supervise(runner: Runner, shutdown: CancellationToken) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let started = Instant::now();
        let outcome = run_once(&runner, &shutdown).await;
        if shutdown.is_cancelled() {
            break;
        }
        if started.elapsed() >= STABLE {
            backoff = MIN_BACKOFF;
        }
        match outcome {
            Ok(status) => {
                warn!(command = "server", exit = %status, retry_in = ?backoff, "pgbackrest server exited; this member cannot serve backups from a standby until it runs again")
            }
            Err(e) => {
                warn!(command = "server", error = %e, retry_in = ?backoff, "cannot start pgbackrest server")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One server lifetime; returns when it exits or, after killing its group, at `shutdown`.
async fn run_once(
    runner: &Runner,
    shutdown: &CancellationToken,
) -> Result<ExitStatus, CommandError> {
    let mut cmd = Command::new(&runner.command);
    cmd.arg(format!("--config={}", runner.config_file.display()))
        .arg("--log-level-console=info")
        .arg("server");
    // The password: the remote processes the server forks connect to the local postgres.
    runner.supervise(&mut cmd);
    let mut child = cmd.spawn().map_err(|source| CommandError::Spawn {
        command: runner.command.display().to_string(),
        source,
    })?;
    let pgid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    info!(command = "server", pid = ?child.id(), "pgbackrest server started");
    let stanza = String::new();
    let out = tokio::spawn(collect(
        child.stdout.take(),
        "server".into(),
        stanza.clone(),
        false,
        false,
    ));
    let err = tokio::spawn(collect(
        child.stderr.take(),
        "server".into(),
        stanza,
        true,
        false,
    ));
    let status = tokio::select! {
        status = child.wait() => status,
        _ = shutdown.cancelled() => {
            kill_group(pgid, &mut child).await;
            let _ = tokio::join!(out, err);
            info!(command = "server", "pgbackrest server stopped");
            return child.wait().await.map_err(|source| CommandError::Spawn {
                command: runner.command.display().to_string(),
                source,
            });
        }
    };
    let _ = tokio::join!(out, err);
    status.map_err(|source| CommandError::Spawn {
        command: runner.command.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `pgbackrest` that counts its starts and leaves a grandchild in its group.
    fn fake(dir: &std::path::Path, body: &str) -> Runner {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("pgbackrest");
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho start >> \"$(dirname \"$0\")/starts\"\n{body}\n"),
        )
        .expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Runner {
            command: path,
            config_file: dir.join("pgbackrest.conf"),
            pgpass: None,
            timeout: Duration::from_secs(1),
        }
    }

    fn starts(dir: &std::path::Path) -> usize {
        std::fs::read_to_string(dir.join("starts"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    }

    #[tokio::test]
    async fn an_exited_server_is_restarted_and_shutdown_kills_its_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The first start exits at once; later ones run with a grandchild until killed.
        let runner = fake(
            dir.path(),
            "d=\"$(dirname \"$0\")\"\n[ \"$(wc -l < \"$d/starts\")\" -eq 1 ] && exit 3\n\
             sleep 300 & echo $! > \"$d/grandchild\"; wait",
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(supervise(runner, shutdown.clone()));
        let grandchild = dir.path().join("grandchild");
        for _ in 0..100 {
            if grandchild.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(starts(dir.path()), 2, "restarted once after the exit");
        let pid: i32 = std::fs::read_to_string(&grandchild)
            .expect("pid")
            .trim()
            .parse()
            .expect("pid");
        assert!(alive(pid));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("supervise returns after shutdown")
            .expect("no panic");
        for _ in 0..50 {
            if !alive(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the server's grandchild {pid} survived the shutdown");
    }
}
