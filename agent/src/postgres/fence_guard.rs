//! The fence guard: a small helper process (`pgwarden fence-guard`) that stops postgres at the
//! fence deadline even when the agent itself is frozen (SIGSTOP, a stalled VM vCPU is not
//! covered: that freezes everything), and that releases the leader at once when the agent dies
//! (see [`super::crash_release`]).
//!
//! The in-process fence (in the supervisor task) cannot fire while the agent is stopped, yet
//! postgres, a separate process, would go on acknowledging writes after the lease expired. The
//! guard is a separate process that the agent only talks to through a pipe:
//!
//! - `arm <deadline_ns> <pid>`: at `deadline_ns` (CLOCK_MONOTONIC, shared by all processes of the
//!   host) send SIGQUIT (immediate shutdown) to postmaster `pid`.
//! - `disarm`: forget the deadline.
//! - `release <token>` / `norelease`: the leader record the agent holds, as its DCS client last
//!   wrote it (an etcd lease id, a Lease's resourceVersion), or none.
//! - `bye`: the agent stops cleanly (it has handed over or, paused, keeps the leader on purpose).
//! - end of input without `bye`: the agent died. With a token, the guard proves postgres stopped
//!   and then releases the leader record if it is still the one the token names; then it exits.
//!
//! The agent re-arms with a later deadline on every confirmed lease renewal, so a healthy agent
//! never lets the guard fire.

use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
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

/// What the agent hands its guard at start.
#[derive(Debug)]
pub struct GuardSpawn<'a> {
    /// Where postgres runs: its processes are found by their working directory.
    pub data_dir: &'a Path,
    /// The agent's lock on the data directory ([`super::agent_lock`]), inherited by the guard
    /// so that a restarted agent waits until the guard has finished with a crash.
    pub lock: Option<&'a std::fs::File>,
    /// The command that releases the leader after a crash (`pgwarden release-leader` with the
    /// agent's own arguments); it reads the token on its standard input.
    pub release: Vec<OsString>,
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
    /// The release token the guard was last told.
    token: Option<String>,
}

impl FenceGuard {
    /// Spawns `pgwarden-fence-guard` from the agent's directory (or `<exe> fence-guard`), in its
    /// own process group so that signals aimed at the agent's group (a terminal's Ctrl-Z) do not
    /// stop it too.
    pub fn spawn(exe: &Path, spawn: GuardSpawn<'_>) -> std::io::Result<FenceGuard> {
        use std::os::unix::process::CommandExt;
        let small = exe.with_file_name("pgwarden-fence-guard");
        let mut command = if small.is_file() {
            Command::new(small)
        } else {
            let mut c = Command::new(exe);
            c.arg("fence-guard");
            c
        };
        command.arg("--data-dir").arg(spawn.data_dir);
        if let Some(lock) = spawn.lock {
            let fd = lock.as_raw_fd();
            command.arg("--lock-fd").arg(fd.to_string());
            inherit_fd(&mut command, fd);
        }
        command.arg("--").args(&spawn.release);
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
                token: None,
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

    /// The leader record the guard may release if this process dies (`None`: nothing to
    /// release). Tokens never contain white space.
    pub fn set_release_token(&self, token: Option<&str>) {
        let result = self
            .pipe
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))
            .and_then(|mut pipe| {
                if pipe.token.as_deref() == token {
                    return Ok(());
                }
                pipe.token = None;
                let line = match token {
                    Some(t) if !t.is_empty() && !t.contains(char::is_whitespace) => {
                        format!("release {t}\n")
                    }
                    _ => "norelease\n".to_owned(),
                };
                pipe.stdin.write_all(line.as_bytes())?;
                pipe.stdin.flush()?;
                pipe.token = token.map(str::to_owned);
                Ok(())
            });
        if let Err(e) = result {
            warn!(error = %e, "cannot tell the fence guard what to release after a crash");
        }
    }

    /// The agent stops cleanly: the guard exits without releasing anything.
    pub fn clean_exit(&self) {
        self.disarm();
        self.send("bye\n", false);
    }
}

impl Drop for FenceGuard {
    fn drop(&mut self) {
        // Not killed: if this process is going down without `clean_exit` (an error, a panic),
        // the guard's crash path is what releases the leader once postgres is gone. It exits by
        // itself when its input closes.
        self.disarm();
        let _ = self.child.try_wait();
    }
}

/// Lets the child inherit `fd` (the standard library opens everything close-on-exec).
#[allow(unsafe_code)]
fn inherit_fd(command: &mut Command, fd: RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the forked child before exec and only calls fcntl, which is
    // async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            let flags = nix::libc::fcntl(fd, nix::libc::F_GETFD);
            if flags < 0
                || nix::libc::fcntl(fd, nix::libc::F_SETFD, flags & !nix::libc::FD_CLOEXEC) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[derive(Debug, Default)]
struct Armed {
    deadline_ns: Option<u128>,
    pid: i32,
    closed: bool,
    /// What to release after a crash.
    token: Option<String>,
    /// The agent said goodbye: its end of input is a clean stop.
    bye: bool,
}

/// One line of the agent's protocol.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Arm { deadline_ns: u128, pid: i32 },
    Disarm,
    Release(String),
    NoRelease,
    Bye,
}

/// Parses one command line; `None` for anything unrecognised.
fn parse(line: &str) -> Option<Line> {
    let mut words = line.split_whitespace();
    let line = match words.next()? {
        "arm" => {
            let deadline_ns = words.next()?.parse().ok()?;
            let pid = words.next()?.parse().ok()?;
            Line::Arm { deadline_ns, pid }
        }
        "disarm" => Line::Disarm,
        "release" => Line::Release(words.next()?.to_owned()),
        "norelease" => Line::NoRelease,
        "bye" => Line::Bye,
        _ => return None,
    };
    words.next().is_none().then_some(line)
}

/// The guard's own arguments: `[--data-dir DIR] [--lock-fd N] [-- RELEASE COMMAND...]`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GuardArgs {
    pub data_dir: Option<PathBuf>,
    pub lock_fd: Option<RawFd>,
    pub release: Vec<OsString>,
}

impl GuardArgs {
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<GuardArgs, String> {
        let mut parsed = GuardArgs::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.to_str() {
                Some("--data-dir") => {
                    parsed.data_dir = Some(args.next().ok_or("--data-dir needs a value")?.into());
                }
                Some("--lock-fd") => {
                    let fd = args.next().ok_or("--lock-fd needs a value")?;
                    parsed.lock_fd = Some(
                        fd.to_str()
                            .and_then(|f| f.parse().ok())
                            .ok_or("--lock-fd needs a number")?,
                    );
                }
                Some("--") => {
                    parsed.release = args.collect();
                    break;
                }
                _ => return Err(format!("unexpected argument {arg:?}")),
            }
        }
        Ok(parsed)
    }
}

/// The guard process's main loop, with its arguments (see [`GuardArgs`]). Returns when its input
/// closes, after the crash release if there is one to do.
pub fn run_guard(args: impl IntoIterator<Item = OsString>) {
    let args = match GuardArgs::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("pgwarden fence-guard: {e}");
            GuardArgs::default()
        }
    };
    let state = Arc::new((Mutex::new(Armed::default()), Condvar::new()));
    let reader_state = state.clone();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            let (lock, cvar) = &*reader_state;
            if let (Some(cmd), Ok(mut armed)) = (parse(&line), lock.lock()) {
                match cmd {
                    Line::Arm { deadline_ns, pid } => {
                        armed.deadline_ns = Some(deadline_ns);
                        armed.pid = pid;
                    }
                    Line::Disarm => armed.deadline_ns = None,
                    Line::Release(token) => armed.token = Some(token),
                    Line::NoRelease => armed.token = None,
                    Line::Bye => armed.bye = true,
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
            let crash = (!armed.bye).then(|| armed.token.take()).flatten();
            let hint = (armed.pid > 0).then_some(armed.pid);
            drop(armed);
            if let (Some(token), Some(data_dir)) = (crash, &args.data_dir) {
                super::crash_release::release_after_crash(data_dir, hint, &token, &args.release);
            }
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
        assert_eq!(
            parse("arm 123 45"),
            Some(Line::Arm {
                deadline_ns: 123,
                pid: 45
            })
        );
        assert_eq!(parse("disarm"), Some(Line::Disarm));
        assert_eq!(
            parse("release etcd-lease:7"),
            Some(Line::Release("etcd-lease:7".into()))
        );
        assert_eq!(parse("release"), None);
        assert_eq!(parse("release a b"), None);
        assert_eq!(parse("norelease"), Some(Line::NoRelease));
        assert_eq!(parse("bye"), Some(Line::Bye));
        assert_eq!(parse("arm x 1"), None);
        assert_eq!(parse("bogus"), None);
    }

    #[test]
    fn arguments_parse() {
        let args = |a: &[&str]| GuardArgs::parse(a.iter().map(OsString::from));
        assert_eq!(args(&[]), Ok(GuardArgs::default()));
        assert_eq!(
            args(&[
                "--data-dir",
                "/d",
                "--lock-fd",
                "5",
                "--",
                "pgwarden",
                "release-leader"
            ]),
            Ok(GuardArgs {
                data_dir: Some("/d".into()),
                lock_fd: Some(5),
                release: vec!["pgwarden".into(), "release-leader".into()],
            })
        );
        assert!(args(&["--lock-fd", "x"]).is_err());
        assert!(args(&["stray"]).is_err());
    }

    #[test]
    fn instants_convert_to_monotonic_nanoseconds() {
        let now = monotonic_ns();
        let later = instant_to_ns(Instant::now() + Duration::from_secs(2));
        assert!(later >= now + 1_900_000_000 && later <= now + 2_500_000_000);
    }
}
