//! `pgwarden-bench`: a 3-member pgwarden cluster and a 3-member Patroni cluster (Debian's
//! `patroni`, unmodified, same PostgreSQL binaries and the same ttl/loop_wait/retry_timeout), run
//! side by side in one process, with repetitions alternating between the two so machine noise hits
//! both alike. Reports medians, min–max and the pgwarden/Patroni ratio of every figure.
//!
//! ```sh
//! scripts/build-release.sh && target/release/pgwarden-bench [--quick] [--reps N] [--idle-secs S]
//!     [--scenarios footprint,rest,switchover,haproxy,failover,sync,scale] [--out DIR]
//! ```

mod load;
mod plot;
mod procstat;
mod report;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use pgwarden_tests::harness::writer::{longest_gap, Ack, Writer, CREATE_TABLE};
use pgwarden_tests::harness::{AgentKind, ClusterOptions, TestEnv};

use report::Report;

#[derive(Parser, Debug)]
#[command(about = "pgwarden vs Patroni, side by side")]
struct Args {
    /// One repetition, short windows: a smoke test of the benchmark itself (used in CI).
    #[arg(long)]
    quick: bool,
    /// Repetitions of failover and switchover per agent.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Idle window for the CPU measurement, seconds.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Also measure failover with synchronous_mode on.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    sync: bool,
    /// Kill the leader at a random point of its 2 s loop_wait cycle. Without it, the kill
    /// comes a fixed time after the switchover that precedes every failover; an agent whose
    /// cycles keep the phase of its takeover (pgwarden: every loop_wait after the acquisition)
    /// is then always killed just after a renewal, with nearly its whole ttl left.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    kill_jitter: bool,
    /// Run the scale phase (1, 10 and 50 single-member clusters on one etcd; not with --quick).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    scale: bool,
    /// Run only these scenarios (comma-separated; the clusters are always bootstrapped):
    /// footprint, rest, switchover, haproxy, failover, sync, scale, or all.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    scenarios: Vec<String>,
    /// Where results.json, results.md and the plots go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

const SCENARIOS: [&str; 7] = [
    "footprint",
    "rest",
    "switchover",
    "haproxy",
    "failover",
    "sync",
    "scale",
];

impl Args {
    fn runs(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == "all" || s == scenario)
    }
}

const TIMEOUT: Duration = Duration::from_secs(120);
/// The clusters' loop_wait.
const LOOP_WAIT: Duration = Duration::from_secs(2);

/// A random duration in `[0, bound)` (std's randomly keyed hasher: no extra dependency).
fn random_below(bound: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX).max(1);
    Duration::from_nanos(random % nanos)
}

fn label(kind: AgentKind) -> &'static str {
    match kind {
        AgentKind::Pgwarden => "pgwarden",
        AgentKind::Patroni => "Patroni",
    }
}

struct Cluster {
    env: TestEnv,
    kind: AgentKind,
}

impl Cluster {
    fn member(&self, name: &str) -> &pgwarden_tests::harness::Member {
        self.env
            .members
            .iter()
            .find(|m| m.name == name)
            .expect("member exists")
    }

    /// Waits until a leader accepts writes and the other two stream from it.
    async fn wait_healthy(&self) -> anyhow::Result<String> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(leader) = self.env.leader().await {
                let m = self.member(&leader);
                let writable = m
                    .sql("SELECT pg_is_in_recovery()::text")
                    .await
                    .is_ok_and(|r| r == vec!["false"]);
                let mut streaming = true;
                for r in self.env.members.iter().filter(|r| r.name != leader) {
                    streaming &= r.is_streaming_replica().await;
                }
                if writable && streaming && self.sync_standby_in_force(&leader).await {
                    return Ok(leader);
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} cluster not healthy in time",
                label(self.kind)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// In synchronous mode, the `sync` key names a standby that the leader replicates to
    /// synchronously. Until then no member may take over from a killed leader (that is the
    /// promise of synchronous mode), so a kill in that window waits for the old leader's return
    /// and measures no failover at all. Always true in asynchronous mode.
    async fn sync_standby_in_force(&self, leader: &str) -> bool {
        if !self.env.options.synchronous_mode {
            return true;
        }
        let key = self
            .env
            .etcd
            .get(&self.env.key("sync"))
            .await
            .ok()
            .flatten();
        let standby = key
            .and_then(|v| serde_json::from_str::<serde_json::Value>(&v).ok())
            .and_then(|v| v.get("sync_standby")?.as_str().map(str::to_owned));
        let Some(standby) = standby else {
            return false;
        };
        let query = format!(
            "SELECT count(*)::text FROM pg_stat_replication \
             WHERE application_name = '{}' AND sync_state = 'sync'",
            standby.replace('\'', "")
        );
        self.member(leader)
            .sql(&query)
            .await
            .is_ok_and(|r| r == vec!["1"])
    }

    /// `replica`'s WAL receiver streams from `leader`: seen on the replica
    /// (`pg_stat_wal_receiver` in state `streaming`, connected to the leader's port) or on the
    /// leader (`pg_stat_replication` lists `replica` as `streaming`), whichever shows it first.
    async fn streams_from(&self, replica: &str, leader: &str) -> bool {
        let leader = self.member(leader);
        let on_replica = format!(
            "SELECT count(*)::text FROM pg_stat_wal_receiver \
             WHERE status = 'streaming' AND sender_port = {}",
            leader.pg_port
        );
        if self
            .member(replica)
            .sql(&on_replica)
            .await
            .is_ok_and(|r| r == vec!["1"])
        {
            return true;
        }
        let on_leader = format!(
            "SELECT count(*)::text FROM pg_stat_replication \
             WHERE application_name = '{}' AND state = 'streaming'",
            replica.replace('\'', "")
        );
        leader.sql(&on_leader).await.is_ok_and(|r| r == vec!["1"])
    }

    /// What a failed repetition left: the `leader` and `sync` keys and each member's last log
    /// lines, so that a miss in a long run can be explained without running it again.
    async fn diagnosis(&self) -> String {
        let mut out = String::new();
        for key in ["leader", "sync"] {
            let value = self.env.etcd.get(&self.env.key(key)).await.ok().flatten();
            out.push_str(&format!("bench: key {key}: {value:?}\n"));
        }
        for m in &self.env.members {
            out.push_str(&format!(
                "----- {} (last 25 lines) -----\n{}\n",
                m.name,
                m.log_tail(25)
            ));
        }
        out
    }

    /// After a failed repetition: starts again any member whose agent is not running (a
    /// failover that failed half-way leaves the killed member down) and waits for a whole
    /// cluster, so one bad repetition costs one figure, not the run.
    async fn recover(&mut self) -> anyhow::Result<()> {
        for m in self.env.members.iter_mut() {
            if !m.process.as_mut().is_some_and(|p| p.is_running()) {
                eprintln!("bench: restarting {} after a failed repetition", m.name);
                m.restart()?;
            }
        }
        self.wait_healthy().await.map(|_| ())
    }
}

/// Records a failed repetition and tries to bring the cluster back; false when that failed too,
/// and the cluster takes no further part in the run.
async fn missed(report: &mut Report, c: &mut Cluster, what: String, error: anyhow::Error) -> bool {
    eprintln!("bench: {what} ({}) failed: {error:#}", label(c.kind));
    eprintln!("{}", c.diagnosis().await);
    report.miss(label(c.kind), &what, &error);
    match c.recover().await {
        Ok(()) => true,
        Err(e) => {
            eprintln!(
                "bench: the {} cluster did not recover: {e:#}",
                label(c.kind)
            );
            report.miss(label(c.kind), "recovery; later repetitions skipped", &e);
            false
        }
    }
}

async fn start_cluster(kind: AgentKind, scope: &str, sync: bool) -> anyhow::Result<(Cluster, f64)> {
    let options = ClusterOptions {
        scope: scope.to_owned(),
        ttl: 10,
        loop_wait: 2,
        retry_timeout: 3,
        synchronous_mode: sync,
    };
    let mut env = TestEnv::start(options).await?;
    for name in ["n0", "n1", "n2"] {
        let i = env.add_member(name);
        let m = &mut env.members[i];
        m.kind = kind;
        agent_log_level(m);
        let pgpass = m.dir.join("pgpass");
        m.set("postgresql.pgpass", pgpass.display().to_string().into());
    }
    let started = Instant::now();
    for i in 0..3 {
        env.start_member(i)?;
    }
    let cluster = Cluster { env, kind };
    let leader = cluster.wait_healthy().await?;
    let secs = started.elapsed().as_secs_f64();
    cluster.member(&leader).sql(CREATE_TABLE).await?;
    Ok((cluster, secs))
}

/// Both agents log at INFO, as Patroni does by default: the test harness runs pgwarden at DEBUG
/// (two lines per cycle), which is not what the footprint should be compared at.
fn agent_log_level(m: &mut pgwarden_tests::harness::Member) {
    m.env.push(("RUST_LOG".into(), "info".into()));
}

fn first_ack_after(acks: &[Ack], after: Instant, not_on: &str) -> Option<Instant> {
    acks.iter()
        .filter(|a| a.at > after && a.member != not_on)
        .map(|a| a.at)
        .min()
}

fn curve(acks: &[Ack], origin: Instant, window: (f64, f64)) -> Vec<(f64, f64)> {
    let mut points = Vec::new();
    let mut count = 0.0;
    for a in acks {
        let t = if a.at >= origin {
            a.at.duration_since(origin).as_secs_f64()
        } else {
            -origin.duration_since(a.at).as_secs_f64()
        };
        count += 1.0;
        if t >= window.0 && t <= window.1 {
            points.push((t, count));
        }
    }
    points
}

struct FailoverOutcome {
    failover: f64,
    after_expiry: Option<f64>,
    /// From the kill to the leader key's deletion by etcd.
    kill_to_expiry: Option<f64>,
    /// What etcd said the leader's lease had left just before the kill.
    lease_left: Option<f64>,
    /// Lease keepalives per second per member while the writer ran, before the kill.
    renewals: f64,
    lost: usize,
    rejoin: f64,
    curve: Vec<(f64, f64)>,
}

/// kill -9 of the leader's agent and postmaster; the time to the first acknowledged write on
/// another member; lost acknowledged writes; then the killed member's rejoin time.
async fn failover(c: &mut Cluster, jitter: bool) -> anyhow::Result<FailoverOutcome> {
    let old = c.wait_healthy().await?;
    let writer = Writer::start(c.env.writer_targets());
    let endpoint = c.env.etcd.endpoint();
    let counters_before = EtcdCounters::read(&endpoint).await;
    let counted_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    if jitter {
        tokio::time::sleep(random_below(LOOP_WAIT)).await;
    }
    // Watch the leader key to learn when the lease expired in etcd.
    let key = c.env.key("leader");
    // A watch, not polling: the key may be re-acquired within milliseconds of its expiry.
    let mut client = etcd_client_connect(&endpoint).await.context("etcd")?;
    let mut stream = client
        .watch(key.as_str(), None)
        .await
        .context("watch the leader key")?;
    let expiry = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let message = tokio::time::timeout_at(deadline, stream.message())
                .await
                .ok()?;
            let response = message.ok()??;
            if response
                .events()
                .iter()
                .any(|e| e.event_type() == etcd_client::EventType::Delete)
            {
                return Some(Instant::now());
            }
        }
    });
    let postmaster = c.member(&old).postmaster_pid();
    let renewals = EtcdCounters::read(&endpoint)
        .await
        .since(counters_before)
        .renewed
        / counted_from.elapsed().as_secs_f64()
        / c.env.members.len() as f64;
    let lease_left = leader_lease_left(&mut client, &key).await;
    let killed_at = Instant::now();
    let member = c.env.member(&old);
    member.agent().kill9();
    if let Some(pid) = postmaster {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(l) = c.env.leader().await.filter(|l| *l != old) {
            if c.member(&l).sql("SELECT 1").await.is_ok() {
                break;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "no failover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acks = writer.stop().await;
    let expired_at = expiry.await.ok().flatten();
    let first = first_ack_after(&acks, killed_at, &old).context("no write after the kill")?;
    let new = c.env.leader().await.context("a leader")?;
    let on_new: std::collections::BTreeSet<i64> = c
        .member(&new)
        .sql("SELECT id::text FROM pgwarden_writer")
        .await?
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    let lost = acks.iter().filter(|a| !on_new.contains(&a.id)).count();
    let restarted = Instant::now();
    c.env.member(&old).restart()?;
    let m = c.member(&old);
    let deadline = Instant::now() + TIMEOUT;
    // Rejoined means replicating again: its WAL receiver streams from the new leader. A member
    // whose postgres runs (and answers `GET /replica`) may still be waiting for a replication
    // slot or retrying its connection every wal_retrieve_retry_interval.
    while !c.streams_from(&old, &new).await {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{old} did not stream from {new} in time; its log ends:\n{}",
            m.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rejoin = restarted.elapsed().as_secs_f64();
    Ok(FailoverOutcome {
        failover: first.duration_since(killed_at).as_secs_f64(),
        after_expiry: expired_at.map(|e| first.saturating_duration_since(e).as_secs_f64()),
        kill_to_expiry: expired_at.map(|e| e.saturating_duration_since(killed_at).as_secs_f64()),
        lease_left,
        renewals,
        lost,
        rejoin,
        curve: curve(&acks, killed_at, (-2.0, 20.0)),
    })
}

async fn etcd_client_connect(endpoint: &str) -> Option<etcd_client::Client> {
    etcd_client::Client::connect([endpoint], None).await.ok()
}

struct SwitchoverOutcome {
    gap: f64,
    total: f64,
    curve: Vec<(f64, f64)>,
}

async fn switchover(c: &Cluster) -> anyhow::Result<SwitchoverOutcome> {
    let old = c.wait_healthy().await?;
    let candidate = c
        .env
        .members
        .iter()
        .map(|m| m.name.clone())
        .find(|n| *n != old)
        .context("a candidate")?;
    let writer = Writer::start(c.env.writer_targets());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let body = format!(r#"{{"leader": "{old}", "candidate": "{candidate}"}}"#);
    let (code, text) = c
        .member(&old)
        .api_request("POST", "/switchover", Some(&body))
        .await
        .context("switchover request")?;
    anyhow::ensure!(code == 200, "switchover answered {code}: {text}");
    let total = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acks = writer.stop().await;
    let window: Vec<Ack> = acks
        .iter()
        .filter(|a| a.at + Duration::from_secs(1) >= started)
        .cloned()
        .collect();
    Ok(SwitchoverOutcome {
        gap: longest_gap(&window).as_secs_f64(),
        total,
        curve: curve(&acks, started, (-2.0, 6.0)),
    })
}

/// A client's longest write gap through HAProxy across a switchover: pgwarden behind our
/// deploy/haproxy/haproxy.cfg, Patroni behind its stock example (`inter 3s fall 3 rise 2`).
/// Returns the gap, the time from the switchover request until a new connection through HAProxy
/// reaches the new primary, and until the new leader's own `GET /primary` answered 200.
async fn haproxy_switchover(c: &Cluster) -> anyhow::Result<(f64, f64, Option<f64>)> {
    use pgwarden_tests::harness::haproxy::{self, reached, Backend, HaProxy};
    let old = c.wait_healthy().await?;
    let (template, section) = match c.kind {
        AgentKind::Pgwarden => (
            std::fs::read_to_string(haproxy::shipped_config_path())
                .context("read deploy/haproxy/haproxy.cfg")?,
            "primary",
        ),
        AgentKind::Patroni => (haproxy::patroni_stock_config(), "batman"),
    };
    let backends: Vec<Backend> = c
        .env
        .members
        .iter()
        .map(|m| Backend {
            name: m.name.clone(),
            pg_port: m.pg_port,
            api_port: m.api_port,
        })
        .collect();
    let name = format!("haproxy-{}", label(c.kind).to_lowercase());
    let proxy = HaProxy::start(c.env.dir.path(), &name, &template, &backends).await?;
    let port = proxy.port(section);
    let password = c.member(&old).superuser_password.clone();
    let routed_to = |member: String| {
        let password = password.clone();
        let pg_port = c.member(&member).pg_port;
        async move {
            let deadline = Instant::now() + TIMEOUT;
            while reached(port, &password).await != Some((pg_port, false)) {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "HAProxy did not route to {member}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        }
    };
    routed_to(old.clone()).await?;
    proxy.wait_settled(section, &old, TIMEOUT).await?;
    let candidate = c
        .env
        .members
        .iter()
        .map(|m| m.name.clone())
        .find(|n| *n != old)
        .context("a candidate")?;
    let writer = Writer::start(vec![pgwarden_tests::harness::writer::Target {
        name: "haproxy".into(),
        port,
        password: password.clone(),
    }]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    // When the new leader's own `GET /primary` turns 200: what HAProxy can see at the soonest.
    let api_port = c.member(&candidate).api_port;
    let primary_ok = tokio::spawn(async move {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if pgwarden_tests::harness::http_request("GET", api_port, "/primary", None)
                .await
                .map(|(s, _)| s)
                == Some(200)
            {
                return Some(started.elapsed().as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    });
    let body = format!(r#"{{"leader": "{old}", "candidate": "{candidate}"}}"#);
    let (code, text) = c
        .member(&old)
        .api_request("POST", "/switchover", Some(&body))
        .await
        .context("switchover request")?;
    anyhow::ensure!(code == 200, "switchover answered {code}: {text}");
    routed_to(candidate.clone()).await?;
    let routed = started.elapsed().as_secs_f64();
    // The writer's own connection may still sit on the demoted primary (refused writes) until
    // HAProxy closes it: wait until its writes land on the new primary again, so that the gap
    // is measured to its end.
    let new = c.member(&candidate);
    let floor = new
        .sql("SELECT coalesce(max(id), 0)::text FROM pgwarden_writer")
        .await?
        .first()
        .cloned()
        .unwrap_or_default();
    let resumed = format!("SELECT count(*)::text FROM pgwarden_writer WHERE id > {floor}");
    let deadline = Instant::now() + TIMEOUT;
    while new
        .sql(&resumed)
        .await
        .ok()
        .and_then(|r| r.first()?.parse::<u64>().ok())
        .unwrap_or(0)
        < 5
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "writes through HAProxy did not resume on {candidate}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acks = writer.stop().await;
    let primary_ok = primary_ok.await.ok().flatten();
    drop(proxy);
    let offset = |a: &Ack| {
        if a.at >= started {
            a.at.duration_since(started).as_secs_f64()
        } else {
            -started.duration_since(a.at).as_secs_f64()
        }
    };
    let before = acks.iter().filter(|a| a.at < started).count();
    let after: Vec<f64> = acks
        .iter()
        .filter(|a| a.at >= started)
        .map(offset)
        .collect();
    eprintln!(
        "bench: through HAProxy: {before} writes before the switchover (last at {:?} s), {} after \
         (first at {:?} s, last at {:?} s); new connections reached the new primary at {routed:.3} s; \
         its GET /primary answered 200 at {primary_ok:?} s",
        acks.iter().filter(|a| a.at < started).map(offset).next_back(),
        after.len(),
        after.first(),
        after.last()
    );
    anyhow::ensure!(before > 0, "no write through HAProxy before the switchover");
    anyhow::ensure!(
        !after.is_empty(),
        "no write through HAProxy after the switchover"
    );
    let window: Vec<Ack> = acks
        .iter()
        .filter(|a| a.at + Duration::from_secs(1) >= started)
        .cloned()
        .collect();
    Ok((longest_gap(&window).as_secs_f64(), routed, primary_ok))
}

/// Sum of the samples of one etcd metric family (all label sets), from its `/metrics`.
async fn etcd_metric(endpoint: &str, family: &str) -> f64 {
    let Ok(out) = tokio::process::Command::new("curl")
        .args(["-s", &format!("http://{endpoint}/metrics")])
        .output()
        .await
    else {
        return 0.0;
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// etcd counters read at the start and the end of a window.
#[derive(Debug, Clone, Copy, Default)]
struct EtcdCounters {
    /// gRPC calls etcd finished (the HTTP gateway Patroni uses is counted there too). A stream
    /// counts once, when it closes: keepalives on a stream kept open are not in it.
    handled: f64,
    /// gRPC messages etcd received: one per unary call, one per message on a stream. This is
    /// the request count that does not depend on how a client groups requests into streams.
    received: f64,
    /// Lease keepalives etcd applied.
    renewed: f64,
}

impl EtcdCounters {
    async fn read(endpoint: &str) -> EtcdCounters {
        EtcdCounters {
            handled: etcd_metric(endpoint, "grpc_server_handled_total").await,
            received: etcd_metric(endpoint, "grpc_server_msg_received_total").await,
            renewed: etcd_metric(endpoint, "etcd_debugging_lease_renewed_total").await,
        }
    }

    fn since(self, before: EtcdCounters) -> EtcdCounters {
        EtcdCounters {
            handled: self.handled - before.handled,
            received: self.received - before.received,
            renewed: self.renewed - before.renewed,
        }
    }
}

/// Seconds the leader key's lease has left in etcd (whole seconds, as etcd reports them).
async fn leader_lease_left(client: &mut etcd_client::Client, key: &str) -> Option<f64> {
    let response = client.get(key, None).await.ok()?;
    let lease = response.kvs().first()?.lease();
    if lease == 0 {
        return None;
    }
    let ttl = client.lease_time_to_live(lease, None).await.ok()?.ttl();
    (ttl >= 0).then_some(ttl as f64)
}

/// `n` single-member clusters of one agent kind on one etcd: idle CPU per member (CPU s per
/// 60 s) and etcd requests (received messages) per second per member over `window`.
async fn scale(kind: AgentKind, n: usize, window: Duration) -> anyhow::Result<(f64, f64)> {
    let options = ClusterOptions {
        scope: "scale0".into(),
        ttl: 10,
        loop_wait: 2,
        retry_timeout: 3,
        synchronous_mode: false,
    };
    let mut env = TestEnv::start(options).await?;
    for i in 0..n {
        let idx = env.add_member(&format!("s{i}"));
        let m = &mut env.members[idx];
        m.kind = kind;
        agent_log_level(m);
        // One cluster per member: each gets its own scope on the shared etcd.
        m.set("scope", format!("scale{i}").into());
        m.set(
            "postgresql.pgpass",
            m.dir.join("pgpass").display().to_string().into(),
        );
    }
    for i in 0..n {
        env.start_member(i)?;
    }
    let deadline = Instant::now() + Duration::from_secs(60 + 10 * n as u64);
    for m in &env.members {
        while m.api_get("/health").await.map(|(s, _)| s) != Some(200) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not start; its log ends:\n{}",
                m.name,
                m.log_tail(15)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let endpoint = env.etcd.endpoint();
    let before = EtcdCounters::read(&endpoint).await;
    let tasks: Vec<_> = env
        .members
        .iter()
        .map(|m| {
            tokio::spawn(procstat::idle_cpu(
                m.process.as_ref().map(|p| p.pid()).unwrap_or(0),
                window,
            ))
        })
        .collect();
    let mut cpu = 0.0;
    for t in tasks {
        cpu += t.await?.0;
    }
    let etcd = EtcdCounters::read(&endpoint).await.since(before);
    let secs = window.as_secs_f64();
    Ok((
        cpu * 60.0 / secs / n as f64,
        etcd.received / secs / n as f64,
    ))
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb / 1024 / 1024)
        .unwrap_or(0);
    format!("{cpus} CPUs ({model}), {mem} GiB RAM")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    // Dropping the benchmark future drops the clusters, which stops every process by PID.
    tokio::select! {
        r = bench(Args::parse()) => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        _ = term.recv() => anyhow::bail!("terminated"),
    }
}

async fn bench(mut args: Args) -> anyhow::Result<()> {
    // Measure the optimised agent when it was built next to this binary.
    if std::env::var_os("PGWARDEN_BIN").is_none() {
        if let Some(release) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("pgwarden")))
            .filter(|p| p.exists())
        {
            std::env::set_var("PGWARDEN_BIN", release);
        }
    }
    for s in &args.scenarios {
        anyhow::ensure!(
            s == "all" || SCENARIOS.contains(&s.as_str()),
            "unknown scenario {s:?}; known: all, {}",
            SCENARIOS.join(", ")
        );
    }
    if args.quick {
        args.reps = 1;
        args.idle_secs = 5;
        args.sync = false;
    }
    std::fs::create_dir_all(&args.out)?;
    let mut report = Report {
        machine: machine(),
        started: chrono::Utc::now().to_rfc3339(),
        settings: format!(
            "3 members each; ttl 10, loop_wait 2, retry_timeout 3; PostgreSQL 15; {} repetition(s)",
            args.reps
        ),
        ..Default::default()
    };
    let kinds = [AgentKind::Pgwarden, AgentKind::Patroni];

    // Bootstrap, alternating.
    let mut clusters = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        eprintln!("bench: bootstrapping the {} cluster", label(*kind));
        let (c, secs) = start_cluster(*kind, &format!("bench{i}"), false).await?;
        let f = report.figure("bootstrap", "s", true);
        match kind {
            AgentKind::Pgwarden => f.pgwarden.push(secs),
            AgentKind::Patroni => f.patroni.push(secs),
        }
        clusters.push(c);
    }

    // Footprint over an idle window, both clusters at once.
    if args.runs("footprint") {
        footprint(&mut report, &clusters, Duration::from_secs(args.idle_secs)).await?;
    }
    if args.runs("rest") {
        rest(&mut report, &clusters, args.quick).await?;
    }

    // Switchovers and failovers, alternating between the agents.
    let mut plots_switch = Vec::new();
    let mut plots_fail = Vec::new();
    let mut alive = vec![true; clusters.len()];
    for rep in 0..args.reps {
        for (c, alive) in clusters.iter_mut().zip(alive.iter_mut()) {
            if !*alive || !args.runs("switchover") {
                continue;
            }
            let what = format!("switchover {} of {}", rep + 1, args.reps);
            eprintln!("bench: {what} ({})", label(c.kind));
            let s = match switchover(c).await {
                Ok(s) => s,
                Err(e) => {
                    *alive = missed(&mut report, c, what, e).await;
                    continue;
                }
            };
            for (name, value) in [
                ("switchover write gap", s.gap),
                ("switchover total", s.total),
            ] {
                let f = report.figure(name, "s", true);
                match c.kind {
                    AgentKind::Pgwarden => f.pgwarden.push(value),
                    AgentKind::Patroni => f.patroni.push(value),
                }
            }
            if rep == 0 {
                plots_switch.push(plot::Line {
                    label: label(c.kind).to_owned(),
                    colour: if c.kind == AgentKind::Pgwarden {
                        "#1f77b4"
                    } else {
                        "#d62728"
                    },
                    points: s.curve,
                });
            }
        }
        for (c, alive) in clusters.iter_mut().zip(alive.iter_mut()) {
            if !*alive || !args.runs("haproxy") {
                continue;
            }
            let what = format!("switchover through HAProxy {} of {}", rep + 1, args.reps);
            eprintln!("bench: {what} ({})", label(c.kind));
            match haproxy_switchover(c).await {
                Ok((gap, routed, primary_ok)) => {
                    let mut figures = vec![
                        ("HAProxy: switchover write gap (pgwarden: deploy/haproxy, Patroni: stock)", gap),
                        ("HAProxy: switchover request → new connections reach the new primary", routed),
                    ];
                    if let Some(t) = primary_ok {
                        figures.push((
                            "HAProxy: switchover request → GET /primary 200 on the new leader",
                            t,
                        ));
                    }
                    for (name, value) in figures {
                        let f = report.figure(name, "s", true);
                        match c.kind {
                            AgentKind::Pgwarden => f.pgwarden.push(value),
                            AgentKind::Patroni => f.patroni.push(value),
                        }
                    }
                }
                Err(e) => *alive = missed(&mut report, c, what, e).await,
            }
        }
        for (c, alive) in clusters.iter_mut().zip(alive.iter_mut()) {
            if !*alive || !args.runs("failover") {
                continue;
            }
            let what = format!("failover {} of {}", rep + 1, args.reps);
            eprintln!("bench: {what} ({})", label(c.kind));
            let o = match failover(c, args.kill_jitter).await {
                Ok(o) => o,
                Err(e) => {
                    *alive = missed(&mut report, c, what, e).await;
                    continue;
                }
            };
            let mut figures = vec![
                ("unplanned failover (kill → first write)", "s", o.failover),
                ("lost acknowledged writes (async)", "writes", o.lost as f64),
                (
                    "rejoin of the killed member (restart → streaming)",
                    "s",
                    o.rejoin,
                ),
            ];
            if let Some(e) = o.after_expiry {
                figures.push(("lease expiry → first write", "s", e));
            }
            figures.push((
                "lease renewals/s per member under writes",
                "1/s",
                o.renewals,
            ));
            if let Some(e) = o.kill_to_expiry {
                figures.push(("kill → lease expiry", "s", e));
            }
            if let Some(e) = o.lease_left {
                figures.push(("leader lease left at the kill (etcd, whole s)", "s", e));
            }
            for (name, unit, value) in figures {
                let f = report.figure(name, unit, true);
                match c.kind {
                    AgentKind::Pgwarden => f.pgwarden.push(value),
                    AgentKind::Patroni => f.patroni.push(value),
                }
            }
            if rep == 0 {
                plots_fail.push(plot::Line {
                    label: label(c.kind).to_owned(),
                    colour: if c.kind == AgentKind::Pgwarden {
                        "#1f77b4"
                    } else {
                        "#d62728"
                    },
                    points: o.curve,
                });
            }
        }
    }
    drop(clusters);

    if args.sync && args.runs("sync") {
        let mut sync_clusters = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            eprintln!(
                "bench: bootstrapping the synchronous {} cluster",
                label(*kind)
            );
            sync_clusters.push(
                start_cluster(*kind, &format!("benchsync{i}"), true)
                    .await?
                    .0,
            );
        }
        let mut alive = vec![true; sync_clusters.len()];
        for rep in 0..args.reps {
            for (c, alive) in sync_clusters.iter_mut().zip(alive.iter_mut()) {
                if !*alive {
                    continue;
                }
                let what = format!("synchronous failover {} of {}", rep + 1, args.reps);
                eprintln!("bench: {what} ({})", label(c.kind));
                let o = match failover(c, args.kill_jitter).await {
                    Ok(o) => o,
                    Err(e) => {
                        *alive = missed(&mut report, c, what, e).await;
                        continue;
                    }
                };
                for (name, unit, value) in [
                    ("sync mode: unplanned failover", "s", o.failover),
                    (
                        "sync mode: lost acknowledged writes",
                        "writes",
                        o.lost as f64,
                    ),
                ] {
                    let f = report.figure(name, unit, true);
                    match c.kind {
                        AgentKind::Pgwarden => f.pgwarden.push(value),
                        AgentKind::Patroni => f.patroni.push(value),
                    }
                }
            }
        }
    }

    if args.scale && !args.quick && args.runs("scale") {
        for n in [1usize, 10, 50] {
            for kind in kinds {
                eprintln!(
                    "bench: scale, {n} single-member clusters of {} on one etcd",
                    label(kind)
                );
                let (cpu, rps) = match scale(kind, n, Duration::from_secs(30)).await {
                    Ok(figures) => figures,
                    Err(e) => {
                        eprintln!("bench: scale {n} ({}) failed: {e:#}", label(kind));
                        report.miss(label(kind), &format!("scale {n}"), &e);
                        continue;
                    }
                };
                for (name, unit, value) in [
                    (
                        format!("scale {n:>2} members: idle CPU per member"),
                        "CPU s per 60 s",
                        cpu,
                    ),
                    (
                        format!("scale {n:>2} members: etcd requests/s per member"),
                        "req/s",
                        rps,
                    ),
                ] {
                    let f = report.figure(&name, unit, true);
                    match kind {
                        AgentKind::Pgwarden => f.pgwarden.push(value),
                        AgentKind::Patroni => f.patroni.push(value),
                    }
                }
            }
        }
    }

    if !plots_switch.is_empty() {
        std::fs::write(
            args.out.join("switchover.svg"),
            plot::svg("Acknowledged writes across a switchover", &plots_switch),
        )?;
    }
    if !plots_fail.is_empty() {
        std::fs::write(
            args.out.join("failover.svg"),
            plot::svg("Acknowledged writes across a kill -9 failover", &plots_fail),
        )?;
    }
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let table = report.table();
    std::fs::write(
        args.out.join("results.md"),
        format!(
            "Machine: {}\n\nSettings: {}\n\nStarted: {}\n\n{table}",
            report.machine, report.settings, report.started
        ),
    )?;
    println!("{table}");
    println!("results in {}", args.out.display());
    Ok(())
}

/// Agent memory and idle CPU, and etcd requests, over an idle window, both clusters at once.
async fn footprint(
    report: &mut Report,
    clusters: &[Cluster],
    window: Duration,
) -> anyhow::Result<()> {
    eprintln!("bench: idle window of {} s", window.as_secs());
    let mut etcd_before = Vec::new();
    for c in clusters {
        etcd_before.push(EtcdCounters::read(&c.env.etcd.endpoint()).await);
    }
    let mut idle = Vec::new();
    for c in clusters {
        for m in &c.env.members {
            let pid = m.process.as_ref().map(|p| p.pid()).unwrap_or(0);
            idle.push((c.kind, tokio::spawn(procstat::idle_cpu(pid, window))));
        }
    }
    for (kind, task) in idle {
        let (cpu, sample) = task.await?;
        for (name, unit, value) in [
            ("agent RSS", "MiB", sample.rss_kib as f64 / 1024.0),
            (
                "agent peak RSS (VmHWM)",
                "MiB",
                sample.hwm_kib as f64 / 1024.0,
            ),
            (
                "agent idle CPU",
                "CPU s per 60 s",
                cpu * 60.0 / window.as_secs_f64(),
            ),
        ] {
            let f = report.figure(name, unit, true);
            match kind {
                AgentKind::Pgwarden => f.pgwarden.push(value),
                AgentKind::Patroni => f.patroni.push(value),
            }
        }
    }
    // Each cluster has its own etcd: its counters are the cluster's requests alone.
    for (c, before) in clusters.iter().zip(etcd_before) {
        let etcd = EtcdCounters::read(&c.env.etcd.endpoint())
            .await
            .since(before);
        let per_member = |v: f64| v / window.as_secs_f64() / c.env.members.len() as f64;
        for (name, value) in [
            (
                "idle etcd requests/s per member (received)",
                per_member(etcd.received),
            ),
            (
                "idle etcd calls/s per member (handled)",
                per_member(etcd.handled),
            ),
            ("idle lease renewals/s per member", per_member(etcd.renewed)),
        ] {
            let f = report.figure(name, "1/s", true);
            match c.kind {
                AgentKind::Pgwarden => f.pgwarden.push(value),
                AgentKind::Patroni => f.patroni.push(value),
            }
        }
    }
    Ok(())
}

/// Throughput and latency of `GET /primary`, idle and under pgbench.
async fn rest(report: &mut Report, clusters: &[Cluster], quick: bool) -> anyhow::Result<()> {
    // REST throughput and latency of GET /primary on the leader.
    let load_secs = if quick { 2 } else { 10 };
    for c in clusters {
        let leader = c.wait_healthy().await?;
        let port = c.member(&leader).api_port;
        eprintln!("bench: GET /primary load on the {} leader", label(c.kind));
        let duration = Duration::from_secs(load_secs);
        let r = match load::run_wrk(port, "/primary", 8, duration).await {
            Some(r) => r,
            None => {
                eprintln!(
                    "bench: wrk not found; using the built-in load generator (slower than wrk)"
                );
                load::run(port, "/primary", 8, duration).await
            }
        };
        eprintln!(
            "bench: {} requests, {} errors, p50 {:.2} ms",
            r.requests, r.errors, r.p50_ms
        );
        for (name, unit, lower, value) in [
            ("GET /primary throughput", "req/s", false, r.per_second),
            ("GET /primary p99 latency", "ms", true, r.p99_ms),
        ] {
            let f = report.figure(name, unit, lower);
            match c.kind {
                AgentKind::Pgwarden => f.pgwarden.push(value),
                AgentKind::Patroni => f.patroni.push(value),
            }
        }
    }

    // GET /primary latency while postgres is busy with pgbench (a member must keep answering
    // health checks fast when the database is loaded).
    for c in clusters {
        let leader = c.wait_healthy().await?;
        let m = c.member(&leader);
        let pgbench = "/usr/lib/postgresql/15/bin/pgbench";
        let conn = [
            "-h",
            "127.0.0.1",
            "-p",
            &m.pg_port.to_string(),
            "-U",
            "postgres",
            "postgres",
        ];
        let init = tokio::process::Command::new(pgbench)
            .arg("-i")
            .arg("-s")
            .arg("2")
            .args(conn)
            .env("PGPASSWORD", &m.superuser_password)
            .output()
            .await?;
        anyhow::ensure!(
            init.status.success(),
            "pgbench -i: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let load = tokio::process::Command::new(pgbench)
            .args(["-c", "4", "-j", "1", "-T", &load_secs.to_string()])
            .args(conn)
            .env("PGPASSWORD", &m.superuser_password)
            .kill_on_drop(true)
            .spawn()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let duration = Duration::from_secs(load_secs.saturating_sub(1).max(1));
        let r = match load::run_wrk(m.api_port, "/primary", 2, duration).await {
            Some(r) => r,
            None => load::run(m.api_port, "/primary", 2, duration).await,
        };
        let _ = load.wait_with_output().await;
        for (name, value) in [
            ("GET /primary p50 under pgbench", r.p50_ms),
            ("GET /primary p99 under pgbench", r.p99_ms),
        ] {
            let f = report.figure(name, "ms", true);
            match c.kind {
                AgentKind::Pgwarden => f.pgwarden.push(value),
                AgentKind::Patroni => f.patroni.push(value),
            }
        }
    }
    Ok(())
}
