//! Proof-of-death release: what the fence guard does when the leader's agent dies without a
//! clean stop (kill -9, OOM kill, panic, a fatal error).
//!
//! Without it the other members wait for the leader lease to run out (ttl). A dead agent is not
//! a silent one, though: the guard, a separate process on the same host, can see that the agent
//! is gone and that postgres is gone. So it
//!
//! 1. makes sure postgres has stopped: no process left whose working directory is the data
//!    directory (the postmaster and every backend `chdir` there), after SIGQUIT and, if that is
//!    not enough, SIGKILL; it gives up (and releases nothing) if it cannot prove it in time;
//! 2. only then runs the release command (`pgwarden release-leader`), which releases the leader
//!    record only if it is still the one the agent last wrote (etcd: the leader key still on
//!    the agent's lease; Kubernetes: the Lease still at the agent's last resourceVersion).
//!
//! If the DCS cannot be reached nothing is released and the lease runs out as before. A
//! restarted agent waits on the data directory's lock, which the guard holds until it is done,
//! so it never starts postgres while the release is under way.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long postgres gets to stop after SIGQUIT (its own immediate shutdown escalates to
/// SIGKILL for its children after 5 s) before the guard kills what is left.
const QUIT_GRACE: Duration = Duration::from_secs(6);
/// How long the guard tries to prove postgres stopped before giving up.
const PROOF_DEADLINE: Duration = Duration::from_secs(12);
/// How long the release command may take.
const RELEASE_DEADLINE: Duration = Duration::from_secs(10);

/// The release command's exit code when the leader record was no longer the one the token
/// names (someone else leads, or the lease already ran out): nothing to release.
pub const EXIT_NOT_OURS: i32 = 3;

/// Why postgres could not be proven stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error("postgres processes {pids:?} are still running in {dir} after {waited:?}")]
    StillRunning {
        pids: Vec<i32>,
        dir: PathBuf,
        waited: Duration,
    },
    #[error("cannot list processes: {0}")]
    Proc(#[source] std::io::Error),
}

/// The guard's crash path; reports on stderr (the agent's log stream).
pub fn release_after_crash(
    data_dir: &Path,
    postmaster_hint: Option<i32>,
    token: &str,
    release: &[OsString],
) {
    eprintln!(
        "pgwarden fence-guard: the agent died without a clean stop; making sure postgres has \
         stopped before releasing the leader"
    );
    let started = Instant::now();
    if let Err(e) = prove_postgres_stopped(data_dir, postmaster_hint, PROOF_DEADLINE) {
        eprintln!(
            "pgwarden fence-guard: {e}; the leader is not released, its lease runs out instead"
        );
        return;
    }
    let Some((program, args)) = release.split_first() else {
        eprintln!("pgwarden fence-guard: no release command; the leader lease runs out instead");
        return;
    };
    match run_release(program, args, token, RELEASE_DEADLINE) {
        Ok(0) => eprintln!(
            "pgwarden fence-guard: postgres is stopped; released the leader ({:.0?} after the \
             agent died)",
            started.elapsed()
        ),
        Ok(EXIT_NOT_OURS) => eprintln!(
            "pgwarden fence-guard: postgres is stopped; the leader record was no longer ours, \
             nothing released"
        ),
        Ok(code) => eprintln!(
            "pgwarden fence-guard: the release failed (exit code {code}); the leader lease runs \
             out instead"
        ),
        Err(e) => eprintln!(
            "pgwarden fence-guard: cannot run the release ({e}); the leader lease runs out \
             instead"
        ),
    }
}

/// Postgres processes whose working directory is `dir` (postgres' processes `chdir` to the data
/// directory). Processes of other users cannot be inspected and are not postgres's: the agent
/// runs postgres as itself. Other programs there (an administrator's shell) are left alone.
pub fn processes_in(dir: &Path) -> Result<Vec<i32>, std::io::Error> {
    processes_in_matching(dir, is_postgres)
}

/// The process runs the `postgres` executable (the postmaster and every backend it forks).
fn is_postgres(proc: &Path) -> bool {
    std::fs::read_link(proc.join("exe")).is_ok_and(|exe| {
        exe.file_name()
            .is_some_and(|n| n == "postgres" || n == "postmaster")
    })
}

fn processes_in_matching(
    dir: &Path,
    matches: impl Fn(&Path) -> bool,
) -> Result<Vec<i32>, std::io::Error> {
    let own = std::process::id();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        // A zombie has no working directory any more: it is dead.
        if std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd == dir)
            && matches(&entry.path())
        {
            if let Ok(pid) = i32::try_from(pid) {
                pids.push(pid);
            }
        }
    }
    Ok(pids)
}

/// Waits until no process runs in `data_dir`, signalling them: SIGQUIT at once (the postmaster
/// already got it from the kernel when the agent died, as its parent-death signal), SIGKILL
/// after [`QUIT_GRACE`].
pub fn prove_postgres_stopped(
    data_dir: &Path,
    postmaster_hint: Option<i32>,
    deadline: Duration,
) -> Result<(), ProofError> {
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let started = Instant::now();
    let mut quit_sent = false;
    let mut kill_sent = false;
    loop {
        let mut pids = processes_in(&dir).map_err(ProofError::Proc)?;
        // The postmaster the agent last armed the fence for and its children, wherever they
        // run (a `data_directory` setting may have moved them elsewhere).
        if let Some(pid) = postmaster_hint.filter(|p| is_postgres(&proc_dir(*p))) {
            for p in std::iter::once(pid).chain(children_of(pid)) {
                if !pids.contains(&p) {
                    pids.push(p);
                }
            }
        }
        if pids.is_empty() {
            return Ok(());
        }
        let waited = started.elapsed();
        if waited >= deadline {
            return Err(ProofError::StillRunning { pids, dir, waited });
        }
        let signal = if !quit_sent {
            quit_sent = true;
            Some(Signal::SIGQUIT)
        } else if !kill_sent && waited >= QUIT_GRACE {
            kill_sent = true;
            Some(Signal::SIGKILL)
        } else {
            None
        };
        if let Some(signal) = signal {
            for pid in &pids {
                let _ = kill(Pid::from_raw(*pid), signal);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn proc_dir(pid: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}"))
}

/// The children of `pid`, over all its threads.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(proc_dir(pid).join("task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// Runs the release command with `token` on its standard input; its exit code.
fn run_release(
    program: &OsString,
    args: &[OsString],
    token: &str,
    deadline: Duration,
) -> std::io::Result<i32> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        // A release that exited early has closed its input: its exit code says why.
        let _ = writeln!(stdin, "{token}");
    }
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.code().unwrap_or(1));
        }
        if started.elapsed() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "it did not finish within {deadline:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_postgres_processes_in_the_directory_count() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new("sleep")
            .arg("30")
            .current_dir(dir.path())
            .spawn()
            .expect("sleep");
        let canonical = std::fs::canonicalize(dir.path()).expect("canonical");
        let pid = i32::try_from(child.id()).expect("pid");
        assert!(processes_in_matching(&canonical, |_| true)
            .expect("proc")
            .contains(&pid));
        // Not a postgres: never signalled (an administrator's shell in the data directory).
        assert!(!processes_in(&canonical).expect("proc").contains(&pid));
        prove_postgres_stopped(dir.path(), None, Duration::ZERO).expect("nothing of postgres");
        assert!(child.try_wait().expect("alive").is_none());
        // As the postmaster hint: signalled only when its executable is postgres.
        prove_postgres_stopped(dir.path(), Some(pid), Duration::ZERO).expect("not postgres");
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn an_empty_directory_is_proven_at_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        prove_postgres_stopped(dir.path(), None, Duration::ZERO).expect("nothing runs there");
    }

    #[test]
    fn the_release_command_gets_the_token_and_its_code_is_returned() {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("token");
        let script = format!("read t; echo \"$t\" > {}; exit 3", out.display());
        let code = run_release(
            &"sh".into(),
            &["-c".into(), script.into()],
            "etcd-lease:42",
            Duration::from_secs(10),
        )
        .expect("runs");
        assert_eq!(code, EXIT_NOT_OURS);
        assert_eq!(
            std::fs::read_to_string(out).expect("written").trim(),
            "etcd-lease:42"
        );
    }
}
