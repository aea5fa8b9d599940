//! Containers for the end-to-end tests of the images: an etcd container and pgwarden instance
//! containers on private Docker networks this harness creates, each container at its own fixed
//! address. Everything is named with a unique prefix and removed when the [`DockerCluster`] is
//! dropped, also when a test panics (then the tail of every container's log is printed first).
//!
//! Two networks: `dcs` joins etcd and the members (the DCS, replication and the REST API calls
//! between members go over it; it is the one a partition scenario disconnects), and `client`
//! joins only the members, so the test's writer on the host can still reach a member that is
//! cut off from the cluster and see whether it keeps accepting writes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{agent_binary, timeout_mult};

/// Why the container tests cannot run here; they print it and return.
pub async fn unavailable() -> Option<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .output(),
    )
    .await;
    match out {
        Err(_) => Some("the Docker daemon does not answer within 20 s".into()),
        Ok(Err(e)) => Some(format!("cannot run `docker` ({e}): is Docker installed?")),
        Ok(Ok(o)) if !o.status.success() => Some(format!(
            "the Docker daemon does not answer: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(Ok(_)) => None,
    }
}

/// Runs `docker ARGS`, returning its trimmed stdout; an error carries the command and stderr.
pub async fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("docker")
        .args(args)
        .output()
        .await
        .context("run docker")?;
    if !out.status.success() {
        bail!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The same, blocking: for [`Drop`], where no runtime may be available.
fn docker_blocking(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds `pgwarden/instance` and `pgwarden/etcd` with `images/build.sh` from the debug binaries
/// of this checkout (the base image and its root filesystem are cached, so only the first run on
/// a machine runs debootstrap).
pub async fn build_images() -> anyhow::Result<()> {
    let bin = agent_binary();
    let bin_dir = bin.parent().context("the agent binary has a directory")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build.sh");
    let started = Instant::now();
    let out = tokio::process::Command::new(&script)
        .args(["--no-cargo", "instance", "etcd"])
        .env("PGWARDEN_BIN_DIR", bin_dir)
        .output()
        .await
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "images/build.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "built the images in {:.0?}:\n{}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// One private network with a subnet of our choosing, so containers get fixed addresses.
struct Network {
    name: String,
    /// The first three octets, `10.213.N`.
    prefix: String,
}

impl Network {
    /// Creates `name` on a free /24 in 10.213.0.0/16 (a range the engine's default pools do not
    /// use), trying others while Docker reports an overlap with an existing network.
    async fn create(name: &str, seed: u32) -> anyhow::Result<Network> {
        let mut last = None;
        for attempt in 0..32u32 {
            let third = (seed.wrapping_add(attempt.wrapping_mul(37))) % 250 + 2;
            let prefix = format!("10.213.{third}");
            let subnet = format!("{prefix}.0/24");
            match docker(&[
                "network", "create", "--driver", "bridge", "--subnet", &subnet, name,
            ])
            .await
            {
                Ok(_) => {
                    return Ok(Network {
                        name: name.to_owned(),
                        prefix,
                    })
                }
                Err(e) if e.to_string().contains("overlap") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no free subnet")))
    }

    fn address(&self, host: u8) -> String {
        format!("{}.{host}", self.prefix)
    }
}

/// Timing of the test cluster (short, as in the process tests).
#[derive(Debug, Clone)]
pub struct Timing {
    pub ttl: u32,
    pub loop_wait: u32,
    pub retry_timeout: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            ttl: 10,
            loop_wait: 1,
            retry_timeout: 3,
        }
    }
}

/// One instance container.
#[derive(Debug, Clone)]
pub struct Node {
    /// Member name (`pg1`), also its host name.
    pub name: String,
    /// Container name (unique per test run).
    pub container: String,
    /// Address on the `dcs` network (connect addresses, replication).
    pub dcs_ip: String,
    /// Address on the `client` network (the test's SQL and REST calls).
    pub client_ip: String,
}

/// etcd and the instance containers of one test.
pub struct DockerCluster {
    pub prefix: String,
    pub scope: String,
    pub timing: Timing,
    pub superuser_password: String,
    pub etcd_container: String,
    pub etcd_ip: String,
    pub nodes: Vec<Node>,
    dcs: Network,
    client: Network,
    /// Holds the members' configuration file until it is copied into the containers.
    _dir: tempfile::TempDir,
}

impl DockerCluster {
    /// Creates the networks, starts etcd and `members` instance containers (not waiting for a
    /// leader).
    pub async fn start(members: usize, timing: Timing) -> anyhow::Result<DockerCluster> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let prefix = format!("pgw-{}-{nanos:x}", std::process::id());
        let seed = std::process::id().wrapping_mul(7919).wrapping_add(nanos);
        let dcs = Network::create(&format!("{prefix}-dcs"), seed).await?;
        // From here on the Drop of the half-built cluster removes whatever exists.
        let mut cluster = DockerCluster {
            scope: "containers".into(),
            timing,
            superuser_password: "postgres-secret".into(),
            etcd_container: format!("{prefix}-etcd"),
            etcd_ip: dcs.address(2),
            nodes: Vec::new(),
            client: Network {
                name: String::new(),
                prefix: String::new(),
            },
            dcs,
            _dir: tempfile::tempdir()?,
            prefix,
        };
        cluster.client = Network::create(
            &format!("{}-client", cluster.prefix),
            seed.wrapping_add(101),
        )
        .await?;
        cluster.start_etcd().await?;
        let config = cluster.write_config()?;
        for i in 1..=members {
            let name = format!("pg{i}");
            let host = u8::try_from(10 + i).context("too many members")?;
            let node = Node {
                container: format!("{}-{name}", cluster.prefix),
                dcs_ip: cluster.dcs.address(host),
                client_ip: cluster.client.address(host),
                name,
            };
            cluster.create_node(&node, &config).await?;
            cluster.nodes.push(node.clone());
            docker(&["start", &node.container]).await?;
        }
        Ok(cluster)
    }

    async fn start_etcd(&self) -> anyhow::Result<()> {
        let url = format!("http://{}", self.etcd_ip);
        docker(&[
            "run",
            "-d",
            "--name",
            &self.etcd_container,
            "--hostname",
            "etcd",
            "--network",
            &self.dcs.name,
            "--ip",
            &self.etcd_ip,
            "pgwarden/etcd:latest",
            "--name=etcd",
            "--data-dir=/var/lib/etcd/data",
            "--listen-client-urls=http://0.0.0.0:2379",
            &format!("--advertise-client-urls={url}:2379"),
            "--listen-peer-urls=http://0.0.0.0:2380",
            &format!("--initial-advertise-peer-urls={url}:2380"),
            &format!("--initial-cluster=etcd={url}:2380"),
        ])
        .await?;
        let endpoint = self.etcd_endpoint();
        let deadline = Instant::now() + Duration::from_secs(60).mul_f64(timeout_mult());
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([endpoint.as_str()], None).await {
                if c.get("/", None).await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the etcd container does not answer at {endpoint}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The image's own file with test timing and the etcd address; the rest by environment.
    fn write_config(&self) -> anyhow::Result<PathBuf> {
        let t = &self.timing;
        let yaml = format!(
            r#"scope: {scope}
namespace: /service/
restapi:
  listen: 0.0.0.0:8008
etcd3:
  hosts: ["{etcd}:2379"]
bootstrap:
  dcs:
    ttl: {ttl}
    loop_wait: {loop_wait}
    retry_timeout: {retry}
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        max_connections: 50
        shared_buffers: 16MB
        wal_keep_size: 128MB
  initdb:
    - encoding: UTF8
    - data-checksums
postgresql:
  listen: 0.0.0.0:5432
  data_dir: /var/lib/pgwarden/data
  pgpass: /var/lib/pgwarden/pgpass
  pg_hba:
    - local all all trust
    - host replication replicator 0.0.0.0/0 scram-sha-256
    - host all all 0.0.0.0/0 scram-sha-256
  authentication:
    superuser:
      username: postgres
    replication:
      username: replicator
    rewind:
      username: rewinder
  parameters:
    unix_socket_directories: /var/run/postgresql
"#,
            scope = self.scope,
            etcd = self.etcd_ip,
            ttl = t.ttl,
            loop_wait = t.loop_wait,
            retry = t.retry_timeout,
        );
        let path = self._dir.path().join("pgwarden.yml");
        std::fs::write(&path, yaml)?;
        // docker cp keeps the mode; the postgres user in the container must read it.
        super::set_mode(&path, 0o644);
        Ok(path)
    }

    async fn create_node(&self, node: &Node, config: &Path) -> anyhow::Result<()> {
        let env = |k: &str, v: &str| format!("{k}={v}");
        docker(&[
            "create",
            "--name",
            &node.container,
            "--hostname",
            &node.name,
            "--network",
            &self.dcs.name,
            "--ip",
            &node.dcs_ip,
            // Room for the clean handover on `docker stop`.
            "--stop-timeout",
            "60",
            "-e",
            &env("PGWARDEN_NAME", &node.name),
            "-e",
            &env(
                "PGWARDEN_RESTAPI_CONNECT_ADDRESS",
                &format!("{}:8008", node.dcs_ip),
            ),
            "-e",
            &env(
                "PGWARDEN_POSTGRESQL_CONNECT_ADDRESS",
                &format!("{}:5432", node.dcs_ip),
            ),
            "-e",
            &env("PGWARDEN_SUPERUSER_PASSWORD", &self.superuser_password),
            "-e",
            "PGWARDEN_REPLICATION_PASSWORD=replicator-secret",
            "-e",
            "PGWARDEN_REWIND_PASSWORD=rewinder-secret",
            "-e",
            "PGWARDEN_LOG_TYPE=plain",
            "pgwarden/instance:latest",
        ])
        .await?;
        docker(&[
            "network",
            "connect",
            "--ip",
            &node.client_ip,
            &self.client.name,
            &node.container,
        ])
        .await?;
        let config = config.to_str().context("config path is UTF-8")?;
        docker(&[
            "cp",
            config,
            &format!("{}:/etc/pgwarden/pgwarden.yml", node.container),
        ])
        .await?;
        Ok(())
    }

    pub fn etcd_endpoint(&self) -> String {
        format!("{}:2379", self.etcd_ip)
    }

    pub fn key(&self, name: &str) -> String {
        format!("/service/{}/{name}", self.scope)
    }

    /// The holder of the leader key; `Err` if etcd did not answer (not the same as no leader).
    pub async fn leader(&self) -> anyhow::Result<Option<String>> {
        let mut c = etcd_client::Client::connect([self.etcd_endpoint()], None).await?;
        let r = c.get(self.key("leader"), None).await?;
        Ok(r.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// How long the leader key's lease has left, as etcd counts it (whole seconds, rounded up):
    /// the instant another member may take over, which a fenced leader must beat.
    pub async fn leader_lease_remaining(&self) -> anyhow::Result<Duration> {
        let mut c = etcd_client::Client::connect([self.etcd_endpoint()], None).await?;
        let r = c.get(self.key("leader"), None).await?;
        let lease = r.kvs().first().context("no leader key")?.lease();
        let ttl = c.lease_time_to_live(lease, None).await?.ttl();
        let secs = u64::try_from(ttl).context("the leader's lease has expired")?;
        Ok(Duration::from_secs(secs))
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no member {name}"))
    }

    /// Cuts `name` off the DCS network (etcd and the other members); the client network stays.
    pub async fn disconnect(&self, name: &str) -> anyhow::Result<()> {
        let node = self.node(name);
        docker(&["network", "disconnect", &self.dcs.name, &node.container]).await?;
        Ok(())
    }

    /// Puts `name` back on the DCS network at its address.
    pub async fn reconnect(&self, name: &str) -> anyhow::Result<()> {
        let node = self.node(name);
        docker(&[
            "network",
            "connect",
            "--ip",
            &node.dcs_ip,
            &self.dcs.name,
            &node.container,
        ])
        .await?;
        Ok(())
    }

    /// `docker inspect` of one field, e.g. `{{.State.ExitCode}}`.
    pub async fn inspect(&self, name: &str, format: &str) -> anyhow::Result<String> {
        docker(&["inspect", "-f", format, &self.node(name).container]).await
    }

    /// The last `n` lines of a container's log (stdout and stderr).
    pub fn log_tail(container: &str, n: usize) -> String {
        let out = std::process::Command::new("docker")
            .args(["logs", "--tail", &n.to_string(), container])
            .output();
        match out {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("(no log: {e})"),
        }
    }

    /// A container's whole log.
    pub async fn log_text(&self, name: &str) -> String {
        let container = self.node(name).container.clone();
        tokio::task::spawn_blocking(move || DockerCluster::log_tail(&container, 100_000))
            .await
            .unwrap_or_default()
    }

    /// `GET path` on a member's REST API over the client network.
    pub async fn api_get(&self, name: &str, path: &str) -> Option<(u16, String)> {
        super::http_request_to(&self.node(name).client_ip, "GET", 8008, path, None).await
    }

    /// Runs a query on a member as the superuser, first column of every row as text.
    pub async fn sql(&self, name: &str, query: &str) -> anyhow::Result<Vec<String>> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&self.node(name).client_ip)
            .port(5432)
            .user("postgres")
            .password(&self.superuser_password)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(3));
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let rows = tokio::time::timeout(Duration::from_secs(10), client.simple_query(query))
            .await
            .context("query timed out")??;
        Ok(super::first_column(&rows))
    }

    /// The member is a hot standby whose WAL receiver streams.
    pub async fn is_streaming_replica(&self, name: &str) -> bool {
        self.sql(
            name,
            "SELECT coalesce((SELECT status FROM pg_stat_wal_receiver LIMIT 1), 'none')",
        )
        .await
        .is_ok_and(|r| r == vec!["streaming"])
    }

    /// The writer's targets: every member at its client-network address.
    pub fn writer_targets(&self) -> Vec<(String, super::writer::Target)> {
        self.nodes
            .iter()
            .map(|n| {
                (
                    n.client_ip.clone(),
                    super::writer::Target {
                        name: n.name.clone(),
                        port: 5432,
                        password: self.superuser_password.clone(),
                    },
                )
            })
            .collect()
    }
}

impl Drop for DockerCluster {
    fn drop(&mut self) {
        let mut containers: Vec<String> = self.nodes.iter().map(|n| n.container.clone()).collect();
        containers.push(self.etcd_container.clone());
        if std::thread::panicking() {
            for c in &containers {
                eprintln!("----- {c} log tail -----\n{}", Self::log_tail(c, 150));
            }
        }
        // By name, never by a pattern: only what this cluster created. `-v` removes the
        // anonymous data volumes with the containers.
        let mut args = vec!["rm", "-f", "-v"];
        args.extend(containers.iter().map(String::as_str));
        let _ = docker_blocking(&args);
        for net in [&self.dcs.name, &self.client.name] {
            if !net.is_empty() {
                let _ = docker_blocking(&["network", "rm", net]);
            }
        }
    }
}
