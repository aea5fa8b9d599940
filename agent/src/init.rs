//! `pgwarden-init`: the tiny init of the instance container, running the agent as its child.
//!
//! While the agent itself was PID 1, its death ended the container's PID namespace and the kernel
//! killed every process in it, the fence guard included. The guard is meant to outlive a crashed
//! agent (wait until postgres is proven stopped, then release the leader key so that the others
//! fail over at once), so PID 1 must be something that does not crash with the agent: this.
//!
//! `pgwarden-init [--grace SECONDS] [--reload-on-change FILE]... -- COMMAND ARGS...`
//!
//! - It marks itself a child subreaper (`PR_SET_CHILD_SUBREAPER`), so orphaned descendants come to
//!   it also when it is not PID 1 (under another init, in the tests).
//! - It runs COMMAND as its only direct child, in a process group of its own (tini's default):
//!   signals a terminal or a `kill -- -PGID` sends to init's group then reach COMMAND once,
//!   through init, not twice (the agent takes a second SIGTERM/SIGINT as "exit now").
//! - It forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to COMMAND (`docker stop`
//!   becomes the agent's clean stop with leader handover).
//! - It reaps every child and orphan with `waitpid(-1)`, so zombies never pile up.
//! - When COMMAND exits it waits until it has no children left (the orphaned fence guard
//!   finishing its release, postgres backends exiting), at most the grace period (default 30 s,
//!   `--grace` or `PGWARDEN_INIT_GRACE`), then SIGKILLs whatever is left. A termination signal
//!   (SIGTERM, SIGINT) during the grace period is reported and ignored; a second one ends the
//!   grace period at once.
//! - With `--reload-on-change FILE` (repeatable) it reads each FILE every second while COMMAND
//!   runs and sends COMMAND SIGHUP when one's content differs from what it last read (a file
//!   that cannot be read is skipped until it can). This is how PgBouncer in the pooler Pods
//!   reloads a changed ConfigMap or Secret: the kubelet updates such a volume by swapping a
//!   symlink, which a poll of the content sees and a watch of the file's inode would miss, and
//!   PgBouncer reloads on SIGHUP without closing client connections.
//! - It exits with COMMAND's exit code, or 128 + the signal that killed it; 2 for a usage error,
//!   127 (126 if not executable) when COMMAND cannot be started, as shells do.
//!
//! Only std and nix, and no threads: signals are blocked and taken with `sigwait`, and the grace
//! period is an `alarm`. It stays resident, so it is kept small.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{alarm, getpid, Pid};

/// The grace period when neither `--grace` nor `PGWARDEN_INIT_GRACE` sets one: more than the
/// fence guard's crash release may take (12 s to prove postgres stopped, 10 s for the release;
/// [`crate::postgres::crash_release`]).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// The signals passed on to COMMAND.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// How long the SIGKILL of what is left may take before init gives up on it (a process in
/// uninterruptible sleep cannot die until its IO returns).
const KILL_WAIT: Duration = Duration::from_secs(5);

const USAGE: &str =
    "usage: pgwarden-init [--grace SECONDS] [--reload-on-change FILE]... -- COMMAND [ARGS...]";

/// How often the `--reload-on-change` files are read.
const RELOAD_POLL: Duration = Duration::from_secs(1);

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    /// Run `command` (program and arguments; never empty) with `grace`; SIGHUP it when a file
    /// of `reload_on_change` changes.
    Run {
        grace: Duration,
        command: Vec<OsString>,
        reload_on_change: Vec<std::path::PathBuf>,
    },
    /// `--help`.
    Help,
}

/// Parses the arguments after the program name; `env_grace` is `PGWARDEN_INIT_GRACE`, which
/// `--grace` overrides.
pub fn parse_args(args: Vec<OsString>, env_grace: Option<OsString>) -> Result<Invocation, String> {
    let seconds = |v: &OsString, from: &str| {
        v.to_str()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .map(|s| Duration::from_secs(u64::from(s)))
            .ok_or_else(|| format!("{from}: {v:?} is not a whole number of seconds"))
    };
    let mut grace = match &env_grace {
        Some(v) if !v.is_empty() => seconds(v, "PGWARDEN_INIT_GRACE")?,
        _ => DEFAULT_GRACE,
    };
    let mut args = args.into_iter();
    let mut command = Vec::new();
    let mut reload_on_change = Vec::new();
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--") => {
                command.extend(args.by_ref());
                break;
            }
            Some("-h" | "--help") => return Ok(Invocation::Help),
            Some("--grace") => {
                let v = args.next().ok_or("--grace needs a number of seconds")?;
                grace = seconds(&v, "--grace")?;
            }
            Some("--reload-on-change") => {
                let v = args.next().ok_or("--reload-on-change needs a file")?;
                reload_on_change.push(v.into());
            }
            Some(s) if s.starts_with("--reload-on-change=") => {
                reload_on_change.push(s["--reload-on-change=".len()..].into());
            }
            Some(s) if s.starts_with("--grace=") => {
                grace = seconds(&OsString::from(&s["--grace=".len()..]), "--grace")?;
            }
            Some(s) if s.starts_with('-') => return Err(format!("unknown option {s}")),
            // The command without `--`.
            _ => {
                command.push(arg);
                command.extend(args.by_ref());
                break;
            }
        }
    }
    if command.is_empty() {
        return Err("no command to run".into());
    }
    Ok(Invocation::Run {
        grace,
        command,
        reload_on_change,
    })
}

/// The files of `--reload-on-change` and what was last read from each.
struct Watched {
    files: Vec<(std::path::PathBuf, Option<Vec<u8>>)>,
}

impl Watched {
    fn new(paths: Vec<std::path::PathBuf>) -> Watched {
        Watched {
            files: paths
                .into_iter()
                .map(|p| {
                    let content = std::fs::read(&p).ok();
                    (p, content)
                })
                .collect(),
        }
    }

    /// Reads every file again; the ones whose content changed (and is readable now).
    fn changed(&mut self) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for (path, last) in &mut self.files {
            let Ok(now) = std::fs::read(&*path) else {
                continue;
            };
            if last.as_ref() != Some(&now) {
                // The first successful read of a file unreadable at start is a change too:
                // COMMAND may have started without it.
                out.push(path.clone());
                *last = Some(now);
            }
        }
        out
    }
}

/// The exit code a shell reports for a wait status: the code, or 128 + the signal number.
fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, signal, _) => Some(128 + signal as i32),
        _ => None,
    }
}

/// How COMMAND ended, for the log.
fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Signaled(_, signal, _) => format!("killed by {signal}"),
        WaitStatus::Exited(_, code) => format!("exit code {code}"),
        other => format!("{other:?}"),
    }
}

/// Runs `pgwarden-init` with the arguments after the program name; returns the exit code.
pub fn run_init(args: Vec<OsString>) -> i32 {
    let (grace, command, reload_on_change) =
        match parse_args(args, std::env::var_os("PGWARDEN_INIT_GRACE")) {
            Ok(Invocation::Run {
                grace,
                command,
                reload_on_change,
            }) => (grace, command, reload_on_change),
            Ok(Invocation::Help) => {
                println!("{USAGE}");
                return 0;
            }
            Err(e) => {
                eprintln!("pgwarden-init: {e}\n{USAGE}");
                return 2;
            }
        };
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        // As PID 1 orphans come here anyway.
        eprintln!("pgwarden-init: cannot become a child subreaper: {e}");
    }
    // Blocked before the spawn so that nothing is lost in between (the child gets an empty mask).
    let mut mask = SigSet::empty();
    for s in FORWARDED {
        mask.add(s);
    }
    mask.add(Signal::SIGCHLD);
    mask.add(Signal::SIGALRM);
    if let Err(e) = mask.thread_block() {
        eprintln!("pgwarden-init: cannot block signals: {e}");
        return 1;
    }
    let name = command[0].to_string_lossy().into_owned();
    // Read before the spawn: what COMMAND starts with is the baseline.
    let mut watched = Watched::new(reload_on_change);
    match spawn(&command, !watched.files.is_empty()) {
        Ok(child) => supervise(child, &name, grace, &mask, &mut watched),
        Err(e) => {
            eprintln!("pgwarden-init: cannot run {name}: {e}");
            if e == Errno::EACCES {
                126
            } else {
                127
            }
        }
    }
}

/// Starts COMMAND (searched in `PATH`) in a process group of its own, with an empty signal mask. `posix_spawnp` rather than `std::process::Command`: std leaves the
/// signal mask as it is, and clearing it in `pre_exec` would need unsafe code. glibc reports a
/// failed exec as the call's error.
/// `hup_default`: SIGHUP is set to its default even if init's parent ignored it (`nohup`): the
/// `--reload-on-change` reloads are init's own SIGHUPs, and an ignored one would never reach
/// COMMAND's handler (a shell cannot even trap a signal ignored at its start).
fn spawn(command: &[OsString], hup_default: bool) -> Result<Pid, Errno> {
    use nix::spawn::{posix_spawnp, PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags};
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |s: &std::ffi::OsStr| CString::new(s.as_bytes()).map_err(|_| Errno::EINVAL);
    let args = command
        .iter()
        .map(|a| c(a))
        .collect::<Result<Vec<_>, _>>()?;
    let env = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            c(&kv)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut attr = PosixSpawnAttr::init()?;
    attr.set_flags(
        PosixSpawnFlags::POSIX_SPAWN_SETPGROUP
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
            | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
    )?;
    attr.set_pgroup(Pid::from_raw(0))?;
    attr.set_sigmask(&SigSet::empty())?;
    // Rust's runtime ignores SIGPIPE, and an ignored signal stays ignored across exec (others
    // that init's parent ignored stay ignored, as under any init).
    let mut default = SigSet::empty();
    default.add(Signal::SIGPIPE);
    if hup_default {
        default.add(Signal::SIGHUP);
    }
    attr.set_sigdefault(&default)?;
    posix_spawnp(
        &args[0],
        &PosixSpawnFileActions::init()?,
        &attr,
        &args,
        &env,
    )
}

/// The main loop: forward signals while COMMAND runs, reap always, then the grace period.
fn supervise(child: Pid, name: &str, grace: Duration, mask: &SigSet, watched: &mut Watched) -> i32 {
    let mut ended: Option<WaitStatus> = None;
    let mut deadline: Option<Instant> = None;
    let mut terminations = 0;
    let mut next_poll = Instant::now() + RELOAD_POLL;
    loop {
        let any_left = reap(|status| {
            if status.pid() == Some(child) && exit_code(status).is_some() {
                ended = Some(status);
            }
        });
        let Some((status, exit)) = ended.and_then(|s| Some((s, exit_code(s)?))) else {
            if !any_left {
                // Cannot happen while COMMAND has not been reaped; do not wait forever.
                eprintln!("pgwarden-init: {name} vanished");
                return 1;
            }
            // COMMAND still runs: take the next signal (or, watching files, the poll's alarm).
            if !watched.files.is_empty() {
                let now = Instant::now();
                if now >= next_poll {
                    let changed = watched.changed();
                    for path in &changed {
                        eprintln!(
                            "pgwarden-init: {} changed; sending SIGHUP to {name}",
                            path.display()
                        );
                    }
                    if !changed.is_empty() {
                        let _ = kill(child, Signal::SIGHUP);
                    }
                    next_poll = now + RELOAD_POLL;
                }
                let left = next_poll.saturating_duration_since(Instant::now());
                alarm::set(
                    u32::try_from(left.as_millis().div_ceil(1000))
                        .unwrap_or(1)
                        .max(1),
                );
            }
            match mask.wait() {
                Ok(Signal::SIGCHLD) | Ok(Signal::SIGALRM) => {}
                Ok(signal) => {
                    let _ = kill(child, signal);
                }
                Err(e) => eprintln!("pgwarden-init: sigwait: {e}"),
            }
            continue;
        };
        if !any_left {
            return exit;
        }
        let end = match deadline {
            Some(end) => end,
            None => {
                let end = Instant::now() + grace;
                deadline = Some(end);
                eprintln!(
                    "pgwarden-init: {name} ended ({}); waiting up to {}s for the {} remaining \
                     process(es)",
                    describe(status),
                    grace.as_secs(),
                    children().len()
                );
                end
            }
        };
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            kill_remaining(&format!("after the grace period of {}s", grace.as_secs()));
            return exit;
        }
        // Whole seconds, rounded up; an early SIGALRM only re-arms it.
        let secs = u32::try_from(left.as_millis().div_ceil(1000))
            .unwrap_or(u32::MAX)
            .max(1);
        alarm::set(secs);
        match mask.wait() {
            Ok(Signal::SIGTERM) | Ok(Signal::SIGINT) => {
                terminations += 1;
                if terminations >= 2 {
                    alarm::cancel();
                    kill_remaining("on a second termination signal");
                    return exit;
                }
                eprintln!(
                    "pgwarden-init: termination signal during the grace period ignored; a second \
                     one kills the remaining processes"
                );
            }
            // SIGCHLD: reap; SIGALRM: check the deadline; the others have nobody to go to.
            Ok(_) => {}
            Err(e) => eprintln!("pgwarden-init: sigwait: {e}"),
        }
    }
}

/// Reaps every exited child, passing each status to `on_exit`; whether any child is left.
fn reap(mut on_exit: impl FnMut(WaitStatus)) -> bool {
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return true,
            Ok(status) => on_exit(status),
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => return false,
            Err(e) => {
                eprintln!("pgwarden-init: waitpid: {e}");
                return true;
            }
        }
    }
}

/// The processes whose parent is this one (from `/proc`; one scan).
fn children() -> Vec<Pid> {
    let me = getpid().as_raw();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // After the parenthesised command: state, ppid, ...
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(me)
        })
        .map(Pid::from_raw)
        .collect()
}

/// SIGKILLs every child until none is left; orphans of the killed ones come here in turn.
fn kill_remaining(why: &str) {
    let started = Instant::now();
    let mut reported = false;
    loop {
        let left = children();
        if !reported && !left.is_empty() {
            eprintln!(
                "pgwarden-init: killing {} remaining process(es) {why}",
                left.len()
            );
            reported = true;
        }
        for pid in left {
            let _ = kill(pid, Signal::SIGKILL);
        }
        if !reap(|_| {}) {
            return;
        }
        if started.elapsed() > KILL_WAIT {
            eprintln!("pgwarden-init: processes survive SIGKILL; exiting without them");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    fn run(grace: u64, command: &[&str]) -> Invocation {
        Invocation::Run {
            grace: Duration::from_secs(grace),
            command: args(command),
            reload_on_change: Vec::new(),
        }
    }

    #[test]
    fn files_to_watch_come_before_the_double_dash() {
        assert_eq!(
            parse_args(
                args(&[
                    "--reload-on-change",
                    "/etc/a.ini",
                    "--reload-on-change=/etc/b.txt",
                    "--",
                    "pgbouncer",
                    "/etc/a.ini"
                ]),
                None
            ),
            Ok(Invocation::Run {
                grace: DEFAULT_GRACE,
                command: args(&["pgbouncer", "/etc/a.ini"]),
                reload_on_change: vec!["/etc/a.ini".into(), "/etc/b.txt".into()],
            })
        );
        assert!(parse_args(args(&["--reload-on-change"]), None).is_err());
    }

    #[test]
    fn a_watched_file_counts_as_changed_when_its_content_differs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pgbouncer.ini");
        let missing = dir.path().join("userlist.txt");
        std::fs::write(&file, "a").expect("write");
        let mut watched = Watched::new(vec![file.clone(), missing.clone()]);
        assert!(watched.changed().is_empty());
        // The same content written again is no change.
        std::fs::write(&file, "a").expect("write");
        assert!(watched.changed().is_empty());
        std::fs::write(&file, "b").expect("write");
        assert_eq!(watched.changed(), vec![file.clone()]);
        assert!(watched.changed().is_empty());
        // A file that appears later is a change once.
        std::fs::write(&missing, "x").expect("write");
        assert_eq!(watched.changed(), vec![missing]);
        // Unreadable for a while: skipped, and the old content is kept.
        std::fs::remove_file(&file).expect("rm");
        assert!(watched.changed().is_empty());
        std::fs::write(&file, "b").expect("write");
        assert!(watched.changed().is_empty());
    }

    #[test]
    fn the_command_follows_the_double_dash() {
        assert_eq!(
            parse_args(args(&["--", "pgwarden", "--grace", "x"]), None),
            Ok(run(30, &["pgwarden", "--grace", "x"]))
        );
        assert_eq!(
            parse_args(args(&["pgwarden", "-c", "f"]), None),
            Ok(run(30, &["pgwarden", "-c", "f"]))
        );
    }

    #[test]
    fn the_flag_overrides_the_environment() {
        let env = Some(OsString::from("7"));
        assert_eq!(
            parse_args(args(&["--", "true"]), env.clone()),
            Ok(run(7, &["true"]))
        );
        assert_eq!(
            parse_args(args(&["--grace", "3", "--", "true"]), env.clone()),
            Ok(run(3, &["true"]))
        );
        assert_eq!(
            parse_args(args(&["--grace=0", "--", "true"]), env),
            Ok(run(0, &["true"]))
        );
    }

    #[test]
    fn usage_errors() {
        assert!(parse_args(args(&[]), None).is_err());
        assert!(parse_args(args(&["--"]), None).is_err());
        assert!(parse_args(args(&["--grace"]), None).is_err());
        assert!(parse_args(args(&["--grace", "soon", "--", "true"]), None).is_err());
        assert!(parse_args(args(&["--wait", "--", "true"]), None).is_err());
        assert!(parse_args(args(&["--", "true"]), Some("-1".into())).is_err());
        assert_eq!(parse_args(args(&["--help"]), None), Ok(Invocation::Help));
    }

    #[test]
    fn exit_codes_are_the_shells() {
        let pid = Pid::from_raw(10);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 3)), Some(3));
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(
            describe(WaitStatus::Signaled(pid, Signal::SIGTERM, false)),
            "killed by SIGTERM"
        );
        assert_eq!(describe(WaitStatus::Exited(pid, 3)), "exit code 3");
    }
}
