//! `pgwarden-init` as a process: exit codes, orphans waited for and reaped, the grace period,
//! signal forwarding. It is a child subreaper, so orphans come to it although it is not PID 1.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const INIT: &str = env!("CARGO_BIN_EXE_pgwarden-init");

/// Generous: the machine may be loaded.
const BOUND: Duration = Duration::from_secs(60);

fn init(args: &[&str]) -> Command {
    let mut c = Command::new(INIT);
    c.args(args).env_remove("PGWARDEN_INIT_GRACE");
    c
}

/// Waits for `child` at most [`BOUND`]; kills it and fails past that.
fn wait_bounded(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("pgwarden-init did not exit within {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first line the command prints (a PID, or a readiness mark).
fn first_line(child: &mut Child) -> String {
    let out = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).expect("read");
    line.trim().to_owned()
}

fn alive(pid: &str) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The parent of `pid` by `/proc/PID/stat`.
fn parent(pid: &str) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn signal(child: &Child, s: Signal) {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    kill(pid, s).expect("kill");
}

#[test]
fn the_exit_code_is_the_commands() {
    let code = |args: &[&str]| init(args).status().expect("run").code();
    assert_eq!(code(&["--", "true"]), Some(0));
    assert_eq!(code(&["--", "sh", "-c", "exit 42"]), Some(42));
    // Killed by a signal: 128 + its number, as a shell reports it.
    assert_eq!(code(&["--", "sh", "-c", "kill -KILL $$"]), Some(137));
    // The command without `--`.
    assert_eq!(code(&["sh", "-c", "exit 7"]), Some(7));
}

#[test]
fn usage_and_spawn_errors_exit_non_zero() {
    let out = init(&[]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no command"));
    let out = init(&["--grace", "soon", "--", "true"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = init(&["--", "/nonexistent/pgwarden"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot run /nonexistent/pgwarden"));
}

#[test]
fn an_orphan_is_waited_for_and_reaped() {
    let mut child = init(&["--", "sh", "-c", "sleep 1 & echo $!; exit 3"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let orphan = first_line(&mut child);
    let status = wait_bounded(&mut child);
    assert_eq!(status.code(), Some(3), "the command's exit code");
    // Had init exited before it, the orphan would have gone to the system's init and live on.
    assert!(
        !alive(&orphan),
        "init exited before its orphan {orphan} did"
    );
}

#[test]
fn the_grace_period_kills_a_long_orphan() {
    let started = Instant::now();
    let mut child = init(&[
        "--grace",
        "1",
        "--",
        "sh",
        "-c",
        "sleep 600 & echo $!; exit 5",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn");
    let orphan = first_line(&mut child);
    let status = wait_bounded(&mut child);
    assert_eq!(status.code(), Some(5));
    assert!(!alive(&orphan), "the orphan {orphan} was killed");
    assert!(started.elapsed() < BOUND);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read");
    assert!(
        stderr.contains("killing 1 remaining process(es) after the grace period"),
        "{stderr}"
    );

    // The same grace from the environment.
    let mut child = init(&["--", "sh", "-c", "sleep 600 & echo $!; exit 6"])
        .env("PGWARDEN_INIT_GRACE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let orphan = first_line(&mut child);
    assert_eq!(wait_bounded(&mut child).code(), Some(6));
    assert!(!alive(&orphan), "the orphan {orphan} was killed");
}

#[test]
fn sigterm_is_forwarded_to_the_command() {
    // A shell that reports the signal it got: init forwards it rather than dying of it.
    let mut child = init(&[
        "--",
        "sh",
        "-c",
        "trap 'exit 42' TERM; echo ready; while :; do sleep 0.1; done",
    ])
    .stdout(Stdio::piped())
    .spawn()
    .expect("spawn");
    assert_eq!(first_line(&mut child), "ready");
    signal(&child, Signal::SIGTERM);
    assert_eq!(wait_bounded(&mut child).code(), Some(42));

    // A command that does not handle it dies of it (the signal mask is not inherited).
    let mut child = init(&["--", "sh", "-c", "echo ready; exec sleep 600"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    assert_eq!(first_line(&mut child), "ready");
    signal(&child, Signal::SIGTERM);
    assert_eq!(wait_bounded(&mut child).code(), Some(128 + 15));
}

#[test]
fn a_second_termination_signal_ends_the_grace_period() {
    let mut child = init(&[
        "--grace",
        "600",
        "--",
        "sh",
        "-c",
        "sleep 600 >/dev/null 2>&1 & echo $!; exit 0",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn");
    let orphan = first_line(&mut child);
    // Once the shell is gone its orphan belongs to init, which is in its grace period.
    let deadline = Instant::now() + BOUND;
    while parent(&orphan) != Some(child.id()) {
        assert!(Instant::now() < deadline, "the orphan never came to init");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Signals do not queue: repeat until init has taken two.
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "init ignores SIGTERM");
        signal(&child, Signal::SIGTERM);
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status.code(), Some(0), "the command's exit code");
    assert!(!alive(&orphan), "the orphan {orphan} was killed");
}

/// A ConfigMap volume's update as the kubelet makes it: the new files in a new directory, then
/// the `..data` symlink swapped to it by a rename. The file's path never changes.
fn swap_volume(dir: &std::path::Path, version: u32, content: &str) {
    let target = dir.join(format!("..v{version}"));
    std::fs::create_dir(&target).expect("mkdir");
    std::fs::write(target.join("pgbouncer.ini"), content).expect("write");
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..v{version}"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap");
}

#[test]
fn a_changed_file_sends_sighup_and_an_unchanged_one_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    swap_volume(dir.path(), 1, "pool_mode = session\n");
    let ini = dir.path().join("pgbouncer.ini");
    std::os::unix::fs::symlink("..data/pgbouncer.ini", &ini).expect("symlink");
    let ini = ini.to_str().expect("utf-8").to_owned();
    // Under `nohup`, SIGHUP ignored from the start: the reloads still reach COMMAND (a shell
    // cannot trap a signal ignored at its start, so init resets it).
    let mut child = Command::new("nohup")
        .arg(INIT)
        .args([
            "--reload-on-change",
            &ini,
            "--",
            "sh",
            "-c",
            "trap 'echo hup' HUP; echo ready; while :; do sleep 0.1; done",
        ])
        .env_remove("PGWARDEN_INIT_GRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Lines through a thread: a missing one fails the test instead of hanging it.
    let out = child.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = || {
        lines
            .recv_timeout(BOUND)
            .unwrap_or_else(|_| "(no line)".to_owned())
    };
    assert_eq!(next_line().trim(), "ready");
    // The same content in a new volume version: no reload.
    swap_volume(dir.path(), 2, "pool_mode = session\n");
    std::thread::sleep(Duration::from_millis(2500));
    swap_volume(dir.path(), 3, "pool_mode = transaction\n");
    let started = Instant::now();
    let line = next_line();
    if line.trim() != "hup" {
        signal(&child, Signal::SIGKILL);
    }
    assert_eq!(line.trim(), "hup", "the first line after `ready`");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "within a few polls"
    );
    signal(&child, Signal::SIGTERM);
    assert_eq!(wait_bounded(&mut child).code(), Some(128 + 15));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read");
    assert_eq!(
        stderr.matches("changed; sending SIGHUP to sh").count(),
        1,
        "{stderr}"
    );
}
