//! The real-process harness: etcd, agents and their postgres, in a temporary directory, on free
//! loopback ports; every process is stopped by PID when the environment is dropped, also when a
//! test panics (and then the tail of every log is printed).

pub mod docker;
pub mod etcd;
pub mod haproxy;
pub mod kube;
pub mod kubelet;
pub mod operator;
pub mod pooler;
pub mod ports;
pub mod process;
pub mod proxy;
pub mod s3;
pub mod tls;
pub mod writer;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_yaml::Value;

use self::etcd::Etcd;
use self::ports::free_port;
use self::process::ProcessGuard;

/// Multiplies every wait (env `PGWARDEN_TEST_TIMEOUT_MULT`) for slow machines.
pub fn timeout_mult() -> f64 {
    std::env::var("PGWARDEN_TEST_TIMEOUT_MULT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0)
}

/// A tool a test needs is missing: outside CI the test says so and passes; under CI (where
/// `scripts/test.sh` installs every tool) that is a broken install and the test fails.
pub fn missing_tool(why: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{why} (under CI the test command installs it)"
    );
    eprintln!("SKIP: {why}");
}

/// PostgreSQL 17's binaries for the major-version upgrade tests: `PGWARDEN_PG17_BIN_DIR`, else
/// where `scripts/build-postgres17.sh` puts them. `None` (after [`missing_tool`], which fails
/// under CI) when they are not there.
pub fn pg17_bin_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("PGWARDEN_PG17_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/pgwarden/postgresql-17/bin"));
    if dir.join("pg_upgrade").is_file() && dir.join("postgres").is_file() {
        return Some(dir);
    }
    missing_tool(&format!(
        "PostgreSQL 17 is not in {} (scripts/build-postgres17.sh puts it there)",
        dir.display()
    ));
    None
}

/// pgBackRest that knows PostgreSQL 17 (trixie's; bookworm's 2.45 does not), where
/// `scripts/build-postgres17.sh` puts it; `None` when it is not there.
pub fn pg17_pgbackrest() -> Option<PathBuf> {
    // The directory holding the `bin` link (not `bin/..`, which is the linked tree's parent).
    let root = std::env::var_os("PGWARDEN_PG17_BIN_DIR")
        .and_then(|bin| PathBuf::from(bin).parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/var/cache/pgwarden/postgresql-17"));
    let command = root.join("pgbackrest");
    command.is_file().then_some(command)
}

/// Polls `check` every 100 ms until it returns true; panics naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout.mul_f64(timeout_mult());
    loop {
        if check().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `pgwarden` binary, built once per test process and copied where an unprivileged user can
/// run it (the checkout may live under a directory only root can enter).
pub fn agent_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let built = match std::env::var_os("PGWARDEN_BIN") {
            Some(p) => PathBuf::from(p),
            None => {
                let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
                let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
                let status = Command::new(cargo)
                    .args(["build", "-p", "pgwarden", "--bins"])
                    .current_dir(&root)
                    .status()
                    .expect("cargo runs");
                assert!(status.success(), "building pgwarden failed");
                let target = std::env::var_os("CARGO_TARGET_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| root.join("target"));
                target.join("debug").join("pgwarden")
            }
        };
        // Statics are never dropped, so the directory outlives this process: the next test
        // process removes it (debug binaries are ~370 MB a copy; left alone they fill the disk).
        remove_dirs_of_gone_processes("pgwarden-bin-");
        let dir = std::env::temp_dir().join(format!("pgwarden-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("bin dir");
        let copy = dir.join("pgwarden");
        link_or_copy(&built, &copy).expect("copy the agent binary");
        // The fence guard the agent spawns, and the init of the container image.
        for helper in ["pgwarden-fence-guard", "pgwarden-init"] {
            let from = built.with_file_name(helper);
            if from.is_file() {
                let to = dir.join(helper);
                link_or_copy(&from, &to).unwrap_or_else(|e| panic!("copy {helper}: {e}"));
                set_mode(&to, 0o755);
            }
        }
        set_mode(&dir, 0o755);
        set_mode(&copy, 0o755);
        copy
    })
    .clone()
}

/// A hard link costs no space and still gives a path outside a root-only checkout; a copy where
/// the temp dir is on another filesystem.
fn link_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(to);
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map(|_| ())
}

/// Removes `<temp dir>/<prefix><pid>` directories whose process is gone (left behind by test
/// processes that ended, also by a panic or kill).
pub fn remove_dirs_of_gone_processes(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !process::pid_alive(pid) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

pub(crate) fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

/// The user agents run as: `postgres` when the tests run as root (postgres refuses root).
#[derive(Debug, Clone)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

pub fn run_as() -> Option<RunAs> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .expect("tests run as root need the `postgres` user (install postgresql-15)");
    Some(RunAs {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        home: user.dir,
    })
}

pub(crate) fn chown_tree(path: &Path, who: &RunAs) {
    let _ = nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(who.uid)),
        Some(nix::unistd::Gid::from_raw(who.gid)),
    );
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            chown_tree(&e.path(), who);
        }
    }
}

/// Settings of a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub scope: String,
    pub ttl: u32,
    pub loop_wait: u32,
    pub retry_timeout: u32,
    pub synchronous_mode: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            scope: "test".into(),
            ttl: 10,
            loop_wait: 1,
            retry_timeout: 3,
            synchronous_mode: false,
        }
    }
}

/// One etcd and any number of members in one temporary directory.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub etcd: Etcd,
    pub options: ClusterOptions,
    pub members: Vec<Member>,
    run_as: Option<RunAs>,
}

impl TestEnv {
    /// Waits until `replicas` members other than `leader` stream.
    pub async fn wait_for_streaming(&self, leader: &str, replicas: usize, timeout: Duration) {
        wait_until(
            &format!("{replicas} replicas stream from {leader}"),
            timeout,
            || async {
                let mut streaming = 0;
                for m in self.members.iter().filter(|m| m.name != leader) {
                    if m.is_streaming_replica().await {
                        streaming += 1;
                    }
                }
                streaming == replicas
            },
        )
        .await;
    }

    pub async fn start(options: ClusterOptions) -> anyhow::Result<TestEnv> {
        let dir = tempfile::Builder::new().prefix("pgw").tempdir()?;
        set_mode(dir.path(), 0o755);
        let etcd = Etcd::start(dir.path()).await?;
        Ok(TestEnv {
            dir,
            etcd,
            options,
            members: Vec::new(),
            run_as: run_as(),
        })
    }

    /// A directory under the test directory that the agents' user may write (a pgBackRest
    /// repository shared by the members).
    pub fn shared_dir(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(&path).expect("create the shared directory");
        set_mode(&path, 0o750);
        if let Some(who) = &self.run_as {
            chown_tree(&path, who);
        }
        path
    }

    /// Base path of the cluster's keys.
    pub fn key(&self, name: &str) -> String {
        format!("/service/{}/{name}", self.options.scope)
    }

    /// Adds a member (not started). `edit` may change its YAML before it is written.
    pub fn add_member(&mut self, name: &str) -> usize {
        let member = Member::new(self, name);
        self.members.push(member);
        self.members.len() - 1
    }

    pub fn member(&mut self, name: &str) -> &mut Member {
        self.members
            .iter_mut()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no member {name}"))
    }

    /// Writes the config of member `i` and starts its agent.
    pub fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        let run_as = self.run_as.clone();
        let dir = self.dir.path().to_owned();
        let member = &mut self.members[i];
        member.write_config()?;
        if let Some(who) = &run_as {
            chown_tree(&dir.join(&member.name), who);
        }
        member.start(run_as.as_ref())
    }

    /// The name of the member holding `leader`, if any.
    pub async fn leader(&self) -> Option<String> {
        self.etcd.get(&self.key("leader")).await.ok().flatten()
    }

    /// Creates the writer's table on `leader` and waits until every other member has replayed
    /// it: a test that kills the leader right after would otherwise race the table's WAL, and
    /// a new leader without the table acknowledges no write at all.
    pub async fn create_writer_table(&self, leader: &str) {
        let m = self
            .members
            .iter()
            .find(|m| m.name == leader)
            .expect("the leader is a member");
        m.sql(writer::CREATE_TABLE)
            .await
            .expect("create the writer table");
        let deadline = Instant::now() + Duration::from_secs(60);
        for other in self.members.iter().filter(|o| o.name != leader) {
            while other
                .sql("SELECT (to_regclass('pgwarden_writer') IS NOT NULL)::text")
                .await
                .ok()
                != Some(vec!["true".to_owned()])
            {
                assert!(
                    Instant::now() < deadline,
                    "{} did not replay the writer table within 60 s",
                    other.name
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Where the writer reaches each member's postgres (its real port, not a proxy).
    pub fn writer_targets(&self) -> Vec<writer::Target> {
        self.members
            .iter()
            .map(|m| writer::Target {
                name: m.name.clone(),
                port: m.pg_port,
                password: m.superuser_password.clone(),
            })
            .collect()
    }

    /// Waits until some member holds `leader`, answers `GET /primary` with 200 (lock-based, as
    /// in Patroni) and `GET /health` with 200 (postgres is running).
    pub async fn wait_for_leader(&self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout.mul_f64(timeout_mult());
        loop {
            if let Some(leader) = self.leader().await {
                if let Some(m) = self.members.iter().find(|m| m.name == leader) {
                    if m.api_get("/primary").await.map(|(s, _)| s) == Some(200)
                        && m.api_get("/health").await.map(|(s, _)| s) == Some(200)
                    {
                        return leader;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for a leader that answers /primary"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- etcd log tail -----\n{}",
                self.etcd.process.log_tail(30)
            );
            for m in &self.members {
                eprintln!("----- {} log tail -----\n{}", m.name, m.log_tail(120));
            }
        }
        // Agents first (their postgres die with them by parent-death signal), then etcd.
        for m in &mut self.members {
            m.process = None;
        }
        for m in &self.members {
            m.kill_postmaster_if_alive();
        }
        // PGWARDEN_KEEP_TEST_DIRS=1 keeps data directories and logs for a post-mortem.
        if std::env::var_os("PGWARDEN_KEEP_TEST_DIRS").is_some() {
            if let Ok(spare) = tempfile::tempdir() {
                let kept = std::mem::replace(&mut self.dir, spare).keep();
                eprintln!("kept the test directory {}", kept.display());
            }
        }
    }
}

/// The agent program a member runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentKind {
    Pgwarden,
    /// Debian's `patroni` package, unmodified.
    Patroni,
}

/// One agent and its postgres.
pub struct Member {
    pub name: String,
    /// Which agent runs this member (the benchmark runs Patroni with the same YAML).
    pub kind: AgentKind,
    pub dir: PathBuf,
    pub api_port: u16,
    pub pg_port: u16,
    pub config: Value,
    pub process: Option<ProcessGuard>,
    pub superuser_password: String,
    /// Extra environment of the agent process (Kubernetes mode: pod name, namespace,
    /// kubeconfig).
    pub env: Vec<(String, String)>,
    /// A program and arguments the agent is run through, which must exec it in the same process
    /// (`prlimit --nofile=1024:1024 --`).
    pub launcher: Vec<String>,
}

impl Member {
    fn new(env: &TestEnv, name: &str) -> Member {
        let dir = env.dir.path().join(name);
        let api_port = free_port();
        let pg_port = free_port();
        let o = &env.options;
        let yaml = format!(
            r#"
scope: {scope}
namespace: /service/
name: {name}
restapi:
  listen: 127.0.0.1:{api_port}
  connect_address: 127.0.0.1:{api_port}
etcd3:
  hosts: ["{etcd}"]
bootstrap:
  dcs:
    ttl: {ttl}
    loop_wait: {loop_wait}
    retry_timeout: {retry}
    maximum_lag_on_failover: 1048576
    synchronous_mode: {sync}
    postgresql:
      use_pg_rewind: true
      parameters:
        max_connections: 50
        shared_buffers: 16MB
  initdb:
    - encoding: UTF8
    - data-checksums
postgresql:
  listen: 127.0.0.1:{pg_port}
  connect_address: 127.0.0.1:{pg_port}
  data_dir: {data}
  bin_dir: {bin}
  pgpass: {dir}/pgpass
  parameters:
    unix_socket_directories: {dir}
  pg_hba:
    - local all all trust
    - host all all 127.0.0.1/32 scram-sha-256
    - host replication replicator 127.0.0.1/32 scram-sha-256
  authentication:
    superuser:
      username: postgres
      password: su-secret
    replication:
      username: replicator
      password: rep-secret
tags: {{}}
"#,
            scope = o.scope,
            etcd = env.etcd.endpoint(),
            ttl = o.ttl,
            loop_wait = o.loop_wait,
            retry = o.retry_timeout,
            sync = o.synchronous_mode,
            data = dir.join("data").display(),
            bin = std::env::var("PGWARDEN_PG_BIN_DIR")
                .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
            dir = dir.display(),
        );
        let config = serde_yaml::from_str(&yaml).expect("the member template is valid YAML");
        Member {
            name: name.to_owned(),
            kind: AgentKind::Pgwarden,
            dir,
            api_port,
            pg_port,
            config,
            process: None,
            superuser_password: "su-secret".into(),
            env: Vec::new(),
            launcher: Vec::new(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.yml")
    }

    /// Bootstraps with `wal_level: logical` and the permanent slots `slots` (YAML, the
    /// dynamic configuration's `slots`).
    pub fn set_permanent_slots(&mut self, slots: &str) {
        self.set(
            "bootstrap.dcs.postgresql.parameters.wal_level",
            "logical".into(),
        );
        self.set(
            "bootstrap.dcs.slots",
            serde_yaml::from_str(slots).expect("slots YAML"),
        );
    }

    /// Sets a value in the member's YAML by dotted path (before start).
    pub fn set(&mut self, path: &str, value: Value) {
        let mut node = &mut self.config;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let map = node.as_mapping_mut().expect("a mapping on the path");
            let key = Value::String((*part).to_owned());
            if i + 1 == parts.len() {
                map.insert(key, value);
                return;
            }
            if !map.contains_key(&key) {
                map.insert(key.clone(), Value::Mapping(Default::default()));
            }
            node = map.get_mut(&key).expect("just inserted");
        }
    }

    /// Runs the member's PostgreSQL programs through wrapper scripts in its own `bin`
    /// directory (before start), so a test can slow one down with [`Member::delay_tool`]. The
    /// wrappers exec the real programs, which find their siblings and share files as usual.
    pub fn wrap_pg_bin_dir(&mut self) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let real = PathBuf::from(
            self.config["postgresql"]["bin_dir"]
                .as_str()
                .context("postgresql.bin_dir is set")?,
        );
        let wrap = self.dir.join("bin");
        std::fs::create_dir_all(&wrap)?;
        for entry in std::fs::read_dir(&real)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let script = format!(
                "#!/bin/sh\nd=$(cat '{w}/{name}.delay' 2>/dev/null)\n[ -n \"$d\" ] && sleep \"$d\"\nexec '{r}/{name}' \"$@\"\n",
                w = wrap.display(),
                r = real.display(),
            );
            let path = wrap.join(&name);
            std::fs::write(&path, script)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        self.set(
            "postgresql.bin_dir",
            Value::String(wrap.display().to_string()),
        );
        Ok(wrap)
    }

    /// Makes every later run of `tool` (through [`Member::wrap_pg_bin_dir`]'s wrappers) sleep
    /// `seconds` first; 0 removes the delay.
    pub fn delay_tool(&self, tool: &str, seconds: u64) -> anyhow::Result<()> {
        let marker = self.dir.join("bin").join(format!("{tool}.delay"));
        if seconds == 0 {
            let _ = std::fs::remove_file(marker);
        } else {
            std::fs::create_dir_all(self.dir.join("bin"))?;
            std::fs::write(marker, format!("{seconds}\n"))?;
        }
        Ok(())
    }

    pub fn write_config(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(self.config_path(), serde_yaml::to_string(&self.config)?)?;
        Ok(())
    }

    fn start(&mut self, run_as: Option<&RunAs>) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt;
        let program = match self.kind {
            AgentKind::Pgwarden => agent_binary(),
            AgentKind::Patroni => PathBuf::from("patroni"),
        };
        let mut cmd = match self.launcher.split_first() {
            Some((launcher, args)) => {
                let mut cmd = Command::new(launcher);
                cmd.args(args).arg(program);
                cmd
            }
            None => Command::new(program),
        };
        cmd.arg(self.config_path())
            .env("RUST_LOG", "info,pgwarden=debug,tokio_postgres=info")
            .env_remove("PGWARDEN_BIN")
            .envs(self.env.iter().cloned());
        if let Some(who) = run_as {
            cmd.uid(who.uid)
                .gid(who.gid)
                .env("HOME", &who.home)
                .env("USER", "postgres");
        }
        let log = self.dir.join("agent.log");
        std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log)
            .context("create the agent log")?;
        if let Some(who) = run_as {
            chown_tree(&log, who);
        }
        self.process = Some(ProcessGuard::spawn(&self.name, cmd, &log)?);
        Ok(())
    }

    /// Runs the agent again on the same directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let run_as = run_as();
        self.process = None;
        self.start(run_as.as_ref())
    }

    pub fn agent(&mut self) -> &mut ProcessGuard {
        self.process.as_mut().expect("the member was started")
    }

    pub fn log_tail(&self, n: usize) -> String {
        self.process
            .as_ref()
            .map(|p| p.log_tail(n))
            .unwrap_or_else(|| {
                let text = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(n)..].join("\n")
            })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// kill -9 of the agent and of its postmaster at once (the postmaster would go by the
    /// parent-death signal anyway; the failover scenarios kill both, as a lost machine does).
    pub fn kill9_with_postmaster(&mut self) {
        let postmaster = self.postmaster_pid();
        self.agent().kill9();
        if let Some(pid) = postmaster {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Host loss: kill -9 of every process of the member at once — the agent, its children
    /// (the fence guard among them) and every process running in the data directory (postgres
    /// and its backends). Nothing survives to release the leader: its lease must run out.
    pub fn kill9_host(&mut self) {
        let agent = self.agent().pid();
        let mut pids = process::children_of(agent);
        pids.push(agent);
        pids.extend(process::running_in(&self.data_dir()));
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.agent().wait_exit(Duration::from_secs(10));
    }

    /// PID of the running postmaster, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        let pid = text.lines().next()?.trim().parse().ok()?;
        process::pid_alive(pid).then_some(pid)
    }

    fn kill_postmaster_if_alive(&self) {
        if let Some(pid) = self.postmaster_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// The REST API is served over TLS (`restapi.certfile` is set).
    pub fn api_tls(&self) -> bool {
        self.config
            .get("restapi")
            .and_then(|r| r.get("certfile"))
            .is_some()
    }

    /// `GET path` on the member's REST API: `(status, body)`, `None` if it does not answer.
    pub async fn api_get(&self, path: &str) -> Option<(u16, String)> {
        self.api_request("GET", path, None).await
    }

    pub async fn api_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Option<(u16, String)> {
        if self.api_tls() {
            let auth = self
                .config
                .get("restapi")
                .and_then(|r| r.get("authentication"))
                .and_then(|a| Some((a.get("username")?.as_str()?, a.get("password")?.as_str()?)))
                .map(|(u, p)| format!("{u}:{p}"));
            https_request(method, self.api_port, path, body, auth.as_deref()).await
        } else {
            http_request(method, self.api_port, path, body).await
        }
    }

    /// Connects as the superuser over TCP.
    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1")
            .port(self.pg_port)
            .user("postgres")
            .password(&self.superuser_password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(3));
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// The member runs as a hot standby whose WAL receiver streams (a replica still being
    /// cloned is not counted, whatever the leader's pg_stat_replication shows).
    pub async fn is_streaming_replica(&self) -> bool {
        self.sql("SELECT coalesce((SELECT status FROM pg_stat_wal_receiver LIMIT 1), 'none')")
            .await
            .is_ok_and(|r| r == vec!["streaming"])
    }

    /// The port and the slot (empty: none) this member's WAL receiver streams from, while it
    /// streams.
    pub async fn streaming_from(&self) -> Option<(u16, String)> {
        let rows = self
            .sql(
                "SELECT sender_port::text || ',' || coalesce(slot_name, '') \
                 FROM pg_stat_wal_receiver WHERE status = 'streaming'",
            )
            .await
            .ok()?;
        let (port, slot) = rows.first()?.split_once(',')?;
        Some((port.parse().ok()?, slot.to_owned()))
    }

    /// Runs a query and returns the first column of every row as text.
    pub async fn sql(&self, query: &str) -> anyhow::Result<Vec<String>> {
        let client = self.connect().await?;
        Ok(first_column(&client.simple_query(query).await?))
    }
}

/// The first column of every row of a simple query, as text.
pub fn first_column(messages: &[tokio_postgres::SimpleQueryMessage]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some(r.get(0).unwrap_or_default().to_owned())
            }
            _ => None,
        })
        .collect()
}

/// An HTTPS request through `curl -k` (the test certificates are self-signed).
pub async fn https_request(
    method: &str,
    port: u16,
    path: &str,
    body: Option<&str>,
    auth: Option<&str>,
) -> Option<(u16, String)> {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args([
        "-sk",
        "--max-time",
        "10",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ]);
    if let Some(b) = body {
        cmd.args(["--data", b]);
    }
    if let Some(a) = auth {
        cmd.args(["-u", a]);
    }
    cmd.arg(format!("https://127.0.0.1:{port}{path}"));
    let out = cmd.output().await.ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    let code: u16 = code.trim().parse().ok()?;
    (code != 0).then(|| (code, body.to_owned()))
}

/// A minimal HTTP/1.1 client (one request per connection) to a loopback port.
pub async fn http_request(
    method: &str,
    port: u16,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, String)> {
    http_request_to("127.0.0.1", method, port, path, body).await
}

/// [`http_request`] to any host (a container's address).
pub async fn http_request_to(
    host: &str,
    method: &str,
    port: u16,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .ok()
        .flatten()
}
