//! `pgwarden-bench`: a 3-member pgwarden cluster and a 3-member Patroni cluster (Debian's
//! `patroni`, unmodified, same PostgreSQL binaries and the same ttl/loop_wait/retry_timeout), run
//! side by side in one process, with repetitions alternating between the two so machine noise hits
//! both alike. Reports medians, min–max and the pgwarden/Patroni ratio of every figure.
//!
//! ```sh
//! scripts/build-release.sh && target/release/pgwarden-bench [--quick] [--reps N] [--idle-secs S]
//!     [--scenarios footprint,rest,switchover,haproxy,failover,sync,scale]
//!     [--profile fast|defaults|both] [--faults agent-crash,host-loss,host-freeze,postgres-crash]
//!     [--out DIR]
//! ```
//!
//! `pgwarden-bench controller-scale [--clusters N] [--samples S] [--idle-secs S]` measures the
//! Kubernetes controller with N PostgresClusters instead ([`controller_scale`]).
//!
//! The `failover` phase runs the failure scenarios of [`faults`] on the leader (agent crash,
//! host loss, host freeze, postgres crash at `primary_start_timeout` 300 and 0) at each timing
//! profile; `sync` runs the agent crash in synchronous mode.

mod controller_scale;
mod faults;
mod load;
mod plot;
mod procstat;
mod report;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgwarden_tests::harness::writer::{longest_gap, split_brain_ticks, Ack, Writer, CREATE_TABLE};
use pgwarden_tests::harness::{AgentKind, ClusterOptions, TestEnv};

use faults::{Fault, Profile, DEFAULTS, FAST};
use report::Report;

#[derive(Parser, Debug)]
#[command(about = "pgwarden vs Patroni, side by side; or the controller at scale")]
// `pgwarden-bench --reps 3` keeps working as before; the subcommand takes its own options only.
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Args,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One pgwarden-controller with N PostgresClusters on a real kube-apiserver (no Pods run):
    /// apply → objects created, spec-change latency, controller memory and CPU.
    ControllerScale(controller_scale::Options),
}

#[derive(clap::Args, Debug)]
struct Args {
    /// One repetition, short windows: a smoke test of the benchmark itself (used in CI).
    #[arg(long)]
    quick: bool,
    /// Repetitions of every switchover and failure scenario, per agent and profile.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Idle window for the CPU measurement, seconds.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Also run the agent crash with synchronous_mode on (the `sync` scenario).
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
    /// Timing profile of the failure scenarios: fast (ttl 10, loop_wait 2, retry_timeout 3,
    /// the clusters of every other scenario), defaults (Patroni's: ttl 30, loop_wait 10,
    /// retry_timeout 10) or both. `--quick` runs fast only.
    #[arg(long, default_value = "both", value_parser = ["fast", "defaults", "both"])]
    profile: String,
    /// Failure scenarios of the `failover` and `sync` phases (comma-separated): agent-crash,
    /// host-loss, host-freeze, postgres-crash (primary_start_timeout 300 and 0), or all.
    /// `sync` runs the agent crash only. `--quick` skips those that wait for a whole lease.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    faults: Vec<String>,
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
    profile: Profile,
    /// The `primary_start_timeout` in the cluster's dynamic configuration.
    primary_start_timeout: u32,
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

async fn start_cluster(
    kind: AgentKind,
    scope: &str,
    sync: bool,
    profile: Profile,
) -> anyhow::Result<(Cluster, f64)> {
    let options = ClusterOptions {
        scope: scope.to_owned(),
        ttl: profile.ttl,
        loop_wait: profile.loop_wait,
        retry_timeout: profile.retry_timeout,
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
    let cluster = Cluster {
        env,
        kind,
        profile,
        primary_start_timeout: 300,
    };
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
    /// From the fault to the first acknowledged write on the member that leads afterwards
    /// (another member, or the same one when postgres was restarted in place).
    failover: f64,
    /// From the fault to the first 200 of `GET /primary` on the member that leads afterwards.
    primary_ok: Option<f64>,
    /// The leader moved to another member.
    moved: bool,
    after_expiry: Option<f64>,
    /// From the fault to the leader key's deletion (by etcd at lease expiry, or released).
    kill_to_expiry: Option<f64>,
    /// What etcd said the leader's lease had left just before the fault.
    lease_left: Option<f64>,
    /// Lease keepalives per second per member while the writer ran, before the fault.
    renewals: f64,
    lost: usize,
    /// Writer ticks in which two members acknowledged: two writable primaries at once.
    two_primaries_ticks: usize,
    /// How long the old leader kept acknowledging writes after the new leader's first.
    old_acked_after_new: f64,
    /// From the recovery of the member (restart, SIGCONT) to streaming from the new leader.
    rejoin: Option<f64>,
    curve: Vec<(f64, f64)>,
}

/// How long the writer keeps writing once another member leads, before the old leader's member
/// is brought back: an orphaned primary (Patroni's postgres after a kill of Patroni) keeps
/// acknowledging writes until then.
const OBSERVE: Duration = Duration::from_secs(2);

/// Sets `primary_start_timeout` in the cluster's dynamic configuration (`PATCH /config`) and
/// waits until every member has read it.
async fn set_primary_start_timeout(c: &mut Cluster, value: u32) -> anyhow::Result<()> {
    if c.primary_start_timeout == value {
        return Ok(());
    }
    let leader = c.wait_healthy().await?;
    let body = format!(r#"{{"primary_start_timeout": {value}}}"#);
    let (code, text) = c
        .member(&leader)
        .api_request("PATCH", "/config", Some(&body))
        .await
        .context("PATCH /config")?;
    anyhow::ensure!(code == 200, "PATCH /config answered {code}: {text}");
    c.primary_start_timeout = value;
    // Every member applies the change from the `config` key within a cycle.
    tokio::time::sleep(Duration::from_secs(u64::from(c.profile.loop_wait) + 1)).await;
    Ok(())
}

/// The fault on the leader, the time to the first acknowledged write on the member that leads
/// afterwards and to its `GET /primary` 200, lost acknowledged writes, two writable primaries,
/// then the old leader's rejoin.
async fn failover(c: &mut Cluster, fault: Fault, jitter: bool) -> anyhow::Result<FailoverOutcome> {
    if let Fault::PostgresCrash {
        primary_start_timeout,
    } = fault
    {
        set_primary_start_timeout(c, primary_start_timeout).await?;
    }
    let old = c.wait_healthy().await?;
    let writer = Writer::start_independent(c.env.writer_targets());
    // Whatever fails, the writer stops: left running it would write on through the next
    // repetitions.
    let run = async {
        let endpoint = c.env.etcd.endpoint();
        let counters_before = EtcdCounters::read(&endpoint).await;
        let counted_from = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        if jitter {
            tokio::time::sleep(random_below(Duration::from_secs(u64::from(
                c.profile.loop_wait,
            ))))
            .await;
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
        let mut frozen = Vec::new();
        match fault {
            Fault::AgentCrash => c.env.member(&old).agent().kill9(),
            Fault::HostLoss => c.env.member(&old).kill9_host(),
            Fault::HostFreeze => frozen = faults::freeze(c.member(&old)),
            Fault::PostgresCrash { .. } => {
                if let Some(pid) = postmaster {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let waited = wait_new_primary(c, &old, postmaster, killed_at, fault).await;
        if waited.is_err() && !frozen.is_empty() {
            faults::thaw(&frozen);
        }
        let (new, primary_at) = waited?;
        let moved = new != old;
        tokio::time::sleep(OBSERVE).await;
        let recovered_at = Instant::now();
        match fault {
            Fault::AgentCrash | Fault::HostLoss => c.env.member(&old).restart()?,
            Fault::HostFreeze => faults::thaw(&frozen),
            Fault::PostgresCrash { .. } => {}
        }
        let mut rejoin = None;
        if moved {
            let deadline = Instant::now() + TIMEOUT;
            // Rejoined means replicating again: its WAL receiver streams from the new leader. A
            // member whose postgres runs (and answers `GET /replica`) may still be waiting for a
            // replication slot or retrying its connection every wal_retrieve_retry_interval.
            while !c.streams_from(&old, &new).await {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{old} did not stream from {new} in time; its log ends:\n{}",
                    c.member(&old).log_tail(20)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            rejoin = Some(recovered_at.elapsed().as_secs_f64());
        }
        // Keep writing a little after the rejoin: a thawed or restarted old leader that still
        // acknowledges writes shows here.
        tokio::time::sleep(Duration::from_secs(1)).await;
        anyhow::Ok((
            killed_at, new, primary_at, moved, rejoin, expiry, renewals, lease_left,
        ))
    }
    .await;
    let acks = writer.stop().await;
    let (killed_at, new, primary_at, moved, rejoin, expiry, renewals, lease_left) = run?;
    let expired_at = expiry.await.ok().flatten();
    // After a restart in place, the first write of the restarted postgres: the first after a
    // pause of its writes (a backend of the killed postmaster may still acknowledge in the
    // first milliseconds).
    let mut previous: Option<Instant> = None;
    let mut first = None;
    for a in acks.iter().filter(|a| a.member == new) {
        let paused = previous.is_none_or(|p| a.at.duration_since(p) > Duration::from_millis(100));
        if a.at > killed_at && (moved || paused) {
            first = Some(a.at);
            break;
        }
        previous = Some(a.at);
    }
    let first = first.context("no write after the fault")?;
    let on_new: std::collections::BTreeSet<i64> = c
        .member(&new)
        .sql("SELECT id::text FROM pgwarden_writer")
        .await?
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    let lost = acks.iter().filter(|a| !on_new.contains(&a.id)).count();
    let old_acked_after_new = if moved {
        acks.iter()
            .filter(|a| a.member == old && a.at > first)
            .map(|a| a.at.duration_since(first).as_secs_f64())
            .fold(0.0, f64::max)
    } else {
        0.0
    };
    Ok(FailoverOutcome {
        failover: first.duration_since(killed_at).as_secs_f64(),
        primary_ok: Some(primary_at.duration_since(killed_at).as_secs_f64()),
        moved,
        after_expiry: expired_at.map(|e| first.saturating_duration_since(e).as_secs_f64()),
        kill_to_expiry: expired_at.map(|e| e.saturating_duration_since(killed_at).as_secs_f64()),
        lease_left,
        renewals,
        lost,
        two_primaries_ticks: split_brain_ticks(&acks).len(),
        old_acked_after_new,
        rejoin,
        curve: curve(&acks, killed_at, (-2.0, 20.0)),
    })
}

/// Waits until a member leads, accepts writes and answers `GET /primary` with 200: another
/// member, or the old leader once it runs a new postmaster (a restart in place). Returns it and
/// when its `GET /primary` first answered 200 (for the old leader: while a new postmaster runs,
/// since its agent may answer 200 from the status of the cycle before the crash throughout a
/// quick restart).
async fn wait_new_primary(
    c: &Cluster,
    old: &str,
    postmaster: Option<i32>,
    killed_at: Instant,
    fault: Fault,
) -> anyhow::Result<(String, Instant)> {
    let ask = Duration::from_millis(500);
    let mut primary_at: std::collections::BTreeMap<String, Instant> = Default::default();
    // Only a restart in place may bring the old leader back, and only its agent is alive.
    let old_may_return = matches!(fault, Fault::PostgresCrash { .. });
    let deadline = killed_at + TIMEOUT;
    loop {
        for m in &c.env.members {
            if m.name == old && !old_may_return {
                continue;
            }
            if primary_at.contains_key(&m.name) {
                continue;
            }
            let status = tokio::time::timeout(ask, m.api_get("/primary"))
                .await
                .ok()
                .flatten()
                .map(|(s, _)| s);
            let restarted = || {
                let now = m.postmaster_pid();
                now.is_some() && now != postmaster
            };
            if status == Some(200) && (m.name != old || restarted()) {
                primary_at.insert(m.name.clone(), Instant::now());
            }
        }
        if let Some(l) = c.env.leader().await {
            let restarted_in_place = l == old && {
                let now = c.member(old).postmaster_pid();
                now.is_some() && now != postmaster
            };
            if (l != old || restarted_in_place) && primary_at.contains_key(&l) {
                let writable = tokio::time::timeout(
                    Duration::from_secs(2),
                    c.member(&l).sql("SELECT pg_is_in_recovery()::text"),
                )
                .await
                .is_ok_and(|r| r.is_ok_and(|r| r == vec!["false"]));
                if writable {
                    let at = primary_at[&l];
                    return Ok((l, at));
                }
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no writable leader with GET /primary 200 after the {}",
            fault.name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let cli = Cli::parse();
    let run = async move {
        match cli.command {
            Some(Command::ControllerScale(options)) => {
                controller_scale::run(options, machine()).await
            }
            None => bench(cli.args).await,
        }
    };
    tokio::select! {
        r = run => r,
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
    let mut faults = Vec::new();
    for name in &args.faults {
        for f in Fault::parse(name)? {
            if !faults.contains(&f) {
                faults.push(f);
            }
        }
    }
    let mut profiles = match args.profile.as_str() {
        "fast" => vec![FAST],
        "defaults" => vec![DEFAULTS],
        _ => vec![FAST, DEFAULTS],
    };
    if args.quick {
        args.reps = 1;
        args.idle_secs = 5;
        args.sync = false;
        profiles.retain(|p| *p == FAST);
        faults.retain(|f| !f.waits_for_lease());
    }
    std::fs::create_dir_all(&args.out)?;
    let mut report = Report {
        machine: machine(),
        started: chrono::Utc::now().to_rfc3339(),
        settings: format!(
            "3 members each; ttl 10, loop_wait 2, retry_timeout 3 (failure scenarios: {}); \
             PostgreSQL 15; {} repetition(s)",
            profiles
                .iter()
                .map(|p| format!(
                    "{}: ttl {}, loop_wait {}, retry_timeout {}",
                    p.name, p.ttl, p.loop_wait, p.retry_timeout
                ))
                .collect::<Vec<_>>()
                .join("; "),
            args.reps
        ),
        ..Default::default()
    };
    let kinds = [AgentKind::Pgwarden, AgentKind::Patroni];

    // Bootstrap, alternating.
    let mut clusters = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        eprintln!("bench: bootstrapping the {} cluster", label(*kind));
        let (c, secs) = start_cluster(*kind, &format!("bench{i}"), false, FAST).await?;
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
    }

    // The failure scenarios, per profile: the fast profile on the clusters above, the defaults
    // on a pair of their own; then the agent crash in synchronous mode.
    for profile in &profiles {
        if !args.runs("failover") {
            break;
        }
        let mut own = Vec::new();
        let on = if *profile == FAST {
            &mut clusters
        } else {
            for (i, kind) in kinds.iter().enumerate() {
                eprintln!(
                    "bench: bootstrapping the {} cluster, profile {}",
                    label(*kind),
                    profile.name
                );
                own.push(
                    start_cluster(*kind, &format!("bench{}{i}", profile.name), false, *profile)
                        .await?
                        .0,
                );
            }
            alive = vec![true; own.len()];
            &mut own
        };
        let plot = (*profile == FAST).then_some(&mut plots_fail);
        run_faults(&mut report, on, &mut alive, &faults, &args, false, plot).await;
    }
    drop(clusters);
    if args.sync && args.runs("sync") && faults.contains(&Fault::AgentCrash) {
        for profile in &profiles {
            let mut sync_clusters = Vec::new();
            for (i, kind) in kinds.iter().enumerate() {
                eprintln!(
                    "bench: bootstrapping the synchronous {} cluster, profile {}",
                    label(*kind),
                    profile.name
                );
                sync_clusters.push(
                    start_cluster(
                        *kind,
                        &format!("benchsync{}{i}", profile.name),
                        true,
                        *profile,
                    )
                    .await?
                    .0,
                );
            }
            let mut alive = vec![true; sync_clusters.len()];
            run_faults(
                &mut report,
                &mut sync_clusters,
                &mut alive,
                &[Fault::AgentCrash],
                &args,
                true,
                None,
            )
            .await;
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
            plot::svg(
                "Acknowledged writes across a kill -9 of the leader's agent",
                &plots_fail,
            ),
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

/// The failure scenarios on one pair of clusters, repetitions alternating between the agents.
/// Figures are named `<scenario> [<profile>]: <figure>`.
async fn run_faults(
    report: &mut Report,
    clusters: &mut [Cluster],
    alive: &mut [bool],
    faults: &[Fault],
    args: &Args,
    sync: bool,
    mut plots: Option<&mut Vec<plot::Line>>,
) {
    for rep in 0..args.reps {
        // primary_start_timeout 300 and 0 in turn, so that the cluster changes it once per
        // repetition, not twice.
        let mut order = faults.to_vec();
        if rep % 2 == 1 {
            order.reverse();
        }
        for fault in order {
            for (c, alive) in clusters.iter_mut().zip(alive.iter_mut()) {
                if !*alive {
                    continue;
                }
                let scenario = format!(
                    "{}{} [{}]",
                    fault.name(),
                    if sync { ", synchronous mode" } else { "" },
                    c.profile.label()
                );
                let what = format!("{scenario} {} of {}", rep + 1, args.reps);
                eprintln!("bench: {what} ({})", label(c.kind));
                let o = match failover(c, fault, args.kill_jitter).await {
                    Ok(o) => o,
                    Err(e) => {
                        *alive = missed(report, c, what, e).await;
                        continue;
                    }
                };
                eprintln!(
                    "bench: {what} ({}): first write {:.3} s, GET /primary {:?}, moved {}, \
                     lost {}, two-primary ticks {}, old acked {:.3} s after the new leader",
                    label(c.kind),
                    o.failover,
                    o.primary_ok,
                    o.moved,
                    o.lost,
                    o.two_primaries_ticks,
                    o.old_acked_after_new
                );
                let mut figures = vec![
                    ("fault → first acknowledged write", "s", o.failover),
                    ("lost acknowledged writes", "writes", o.lost as f64),
                    (
                        "writer ticks with two writable primaries",
                        "ticks",
                        o.two_primaries_ticks as f64,
                    ),
                    (
                        "leader moved to another member",
                        "0/1",
                        f64::from(u8::from(o.moved)),
                    ),
                ];
                if let Some(t) = o.primary_ok {
                    figures.push(("fault → GET /primary 200 on the leader", "s", t));
                }
                if o.moved {
                    figures.push((
                        "old leader acknowledging after the new leader's first write",
                        "s",
                        o.old_acked_after_new,
                    ));
                }
                if let Some(t) = o.rejoin {
                    figures.push(("rejoin (restart or SIGCONT → streaming)", "s", t));
                }
                if let Some(e) = o.kill_to_expiry {
                    figures.push(("fault → leader key deleted (expiry or release)", "s", e));
                }
                if let Some(e) = o.after_expiry {
                    figures.push(("leader key deleted → first write", "s", e));
                }
                if fault == Fault::HostLoss {
                    figures.push((
                        "lease renewals/s per member under writes",
                        "1/s",
                        o.renewals,
                    ));
                    if let Some(e) = o.lease_left {
                        figures.push(("leader lease left at the fault (etcd, whole s)", "s", e));
                    }
                }
                for (name, unit, value) in figures {
                    let f = report.figure(&format!("{scenario}: {name}"), unit, true);
                    match c.kind {
                        AgentKind::Pgwarden => f.pgwarden.push(value),
                        AgentKind::Patroni => f.patroni.push(value),
                    }
                }
                if rep == 0 && fault == Fault::AgentCrash {
                    if let Some(plots) = plots.as_deref_mut() {
                        plots.push(plot::Line {
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
        }
    }
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
