//! The fence guard: a small helper process (`pgwarden fence-guard`) that stops postgres at the
//! fence deadline even when the agent itself is frozen (SIGSTOP, a stalled VM vCPU is not
//! covered: that freezes everything).
//!
//! The in-process fence (in the supervisor task) cannot fire while the agent is stopped, yet
//! postgres, a separate process, would go on acknowledging writes after the lease expired. The
//! guard is a separate process that the agent only talks to through a pipe:
//!
//! - `arm <deadline_ns> <pid>`: at `deadline_ns` (CLOCK_MONOTONIC, shared by all processes of the
//!   host) send SIGQUIT (immediate shutdown) to postmaster `pid`.
//! - `disarm`: forget the deadline.
//! - end of input: the agent is gone; exit (postgres then has its own parent-death signal).
//!
//! The agent re-arms with a later deadline on every confirmed lease renewal, so a healthy agent
//! never lets the guard fire.

use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::Pid;
use tracing::{debug, warn};

/// Nanoseconds of CLOCK_MONOTONIC now.
fn monotonic_ns() -> u128 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u128::from(t.tv_sec().unsigned_abs()) * 1_000_000_000
                + u128::from(t.tv_nsec().unsigned_abs())
        })
        .unwrap_or(0)
}

/// Converts an `Instant` (CLOCK_MONOTONIC on Linux) to CLOCK_MONOTONIC nanoseconds.
fn instant_to_ns(at: Instant) -> u128 {
    let now_i = Instant::now();
    let now_ns = monotonic_ns();
    if at >= now_i {
        now_ns + (at - now_i).as_nanos()
    } else {
        now_ns.saturating_sub((now_i - at).as_nanos())
    }
}

/// The agent's end of the pipe.
#[derive(Debug)]
pub struct FenceGuard {
    child: Child,
    pipe: Mutex<Pipe>,
}

#[derive(Debug)]
struct Pipe {
    stdin: ChildStdin,
    /// What the guard was last told was a disarm (it starts disarmed): a repeated disarm would
    /// only wake it.
    disarmed: bool,
}

impl FenceGuard {
    /// Spawns `pgwarden-fence-guard` from the agent's directory (or `<exe> fence-guard`), in its
    /// own process group so that signals aimed at the agent's group (a terminal's Ctrl-Z) do not
    /// stop it too.
    pub fn spawn(exe: &std::path::Path) -> std::io::Result<FenceGuard> {
        use std::os::unix::process::CommandExt;
        let small = exe.with_file_name("pgwarden-fence-guard");
        let mut command = if small.is_file() {
            Command::new(small)
        } else {
            let mut c = Command::new(exe);
            c.arg("fence-guard");
            c
        };
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("fence guard has no stdin"))?;
        Ok(FenceGuard {
            child,
            pipe: Mutex::new(Pipe {
                stdin,
                disarmed: true,
            }),
        })
    }

    fn send(&self, line: &str, disarm: bool) {
        let result = self
            .pipe
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))
            .and_then(|mut pipe| {
                if disarm && pipe.disarmed {
                    return Ok(());
                }
                // Cleared before the attempt: after a failed write the guard's state is unknown,
                // and the next disarm must be sent.
                pipe.disarmed = false;
                pipe.stdin.write_all(line.as_bytes())?;
                pipe.stdin.flush()?;
                pipe.disarmed = disarm;
                Ok(())
            });
        if let Err(e) = result {
            warn!(error = %e, "cannot talk to the fence guard");
        }
    }

    /// Arms the guard to stop `postmaster_pid` at `deadline`.
    pub fn arm(&self, deadline: Instant, postmaster_pid: u32) {
        self.send(
            &format!("arm {} {postmaster_pid}\n", instant_to_ns(deadline)),
            false,
        );
    }

    pub fn disarm(&self) {
        self.send("disarm\n", true);
    }
}

impl Drop for FenceGuard {
    fn drop(&mut self) {
        self.disarm();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Default)]
struct Armed {
    deadline_ns: Option<u128>,
    pid: i32,
    closed: bool,
}

/// Parses one command line; `None` for anything unrecognised.
fn parse(line: &str) -> Option<Option<(u128, i32)>> {
    let mut words = line.split_whitespace();
    match words.next()? {
        "arm" => {
            let deadline = words.next()?.parse().ok()?;
            let pid = words.next()?.parse().ok()?;
            Some(Some((deadline, pid)))
        }
        "disarm" => Some(None),
        _ => None,
    }
}

/// The guard process's main loop. Returns when its input closes.
pub fn run_guard() {
    let state = Arc::new((Mutex::new(Armed::default()), Condvar::new()));
    let reader_state = state.clone();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            let (lock, cvar) = &*reader_state;
            if let (Some(cmd), Ok(mut armed)) = (parse(&line), lock.lock()) {
                match cmd {
                    Some((deadline, pid)) => {
                        armed.deadline_ns = Some(deadline);
                        armed.pid = pid;
                    }
                    None => armed.deadline_ns = None,
                }
                cvar.notify_all();
            }
        }
        let (lock, cvar) = &*reader_state;
        if let Ok(mut armed) = lock.lock() {
            armed.closed = true;
        }
        cvar.notify_all();
    });
    let (lock, cvar) = &*state;
    let Ok(mut armed) = lock.lock() else { return };
    loop {
        if armed.closed {
            return;
        }
        match armed.deadline_ns {
            None => match cvar.wait(armed) {
                Ok(g) => armed = g,
                Err(_) => return,
            },
            Some(deadline) => {
                let now = monotonic_ns();
                if now >= deadline {
                    eprintln!(
                        "pgwarden fence-guard: the agent did not renew its lease in time; \
                         stopping postgres (pid {}) immediately",
                        armed.pid
                    );
                    let _ = kill(Pid::from_raw(armed.pid), Signal::SIGQUIT);
                    armed.deadline_ns = None;
                    continue;
                }
                let wait = Duration::from_nanos(u64::try_from(deadline - now).unwrap_or(u64::MAX));
                match cvar.wait_timeout(armed, wait) {
                    Ok((g, _)) => armed = g,
                    Err(_) => return,
                }
            }
        }
        debug!("fence guard woke");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(parse("arm 123 45"), Some(Some((123, 45))));
        assert_eq!(parse("disarm"), Some(None));
        assert_eq!(parse("arm x 1"), None);
        assert_eq!(parse("bogus"), None);
    }

    #[test]
    fn instants_convert_to_monotonic_nanoseconds() {
        let now = monotonic_ns();
        let later = instant_to_ns(Instant::now() + Duration::from_secs(2));
        assert!(later >= now + 1_900_000_000 && later <= now + 2_500_000_000);
    }
}
