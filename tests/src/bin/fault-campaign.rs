//! `fault-campaign`: randomized fault schedules against a real 3-member cluster (real etcd,
//! PostgreSQL 15 and agents), with a writer recording every acknowledged write and the
//! split-brain checker of the failover tests. Not part of CI: 100 schedules take about an hour.
//!
//! ```sh
//! cargo run -p pgwarden-tests --bin fault-campaign -- --schedules 100 --out target/fault-campaign
//! ```
//!
//! Each schedule is drawn from its own seed (`--seed` + its index) and lists up to three faults
//! with their start and duration: kill -9 of an agent (with or without its postmaster), a crash
//! of postgres alone, SIGSTOP/SIGCONT of an agent, a member's etcd connection cut (reset) or
//! black-holed (silent), every member's etcd black-holed at once, a member's postgres cut off
//! from its replicas, and switchovers or manual failovers issued at random moments. Faults are
//! aimed at whoever leads, or is a replica, at the moment they are injected. Every schedule runs
//! with synchronous mode on or off (`--mode`). After the last fault heals, the cluster must
//! become whole again (one leader that accepts writes, both others streaming from it), and then:
//!
//! - no tick of the writer may have two members acknowledging (split brain);
//! - with synchronous mode, every acknowledged id must be on the leader (async losses are
//!   counted, not failed: asynchronous replication does not promise them).
//!
//! Results: one JSON line per schedule in `<out>/schedules.jsonl`, totals in
//! `<out>/summary.json` and printed at the end, and agent log tails of every schedule that broke
//! an invariant in `<out>/schedule-<n>/`. A schedule's faults replay exactly with
//! `--seed <its seed> --schedules 1`; the cluster's own timing does not (real processes).
//! Exits non-zero when any invariant was broken.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgwarden_tests::harness::proxy::TcpProxy;
use pgwarden_tests::harness::writer::{split_brain_ticks, Ack, Writer, CREATE_TABLE};
use pgwarden_tests::harness::{ClusterOptions, TestEnv};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "Randomized fault schedules against a real 3-member pgwarden cluster")]
struct Args {
    /// How many schedules to run.
    #[arg(long, default_value_t = 100)]
    schedules: u64,
    /// Seed of the first schedule (the n-th uses seed + n); random when not given.
    #[arg(long)]
    seed: Option<u64>,
    /// Replication mode of the schedules.
    #[arg(long, value_enum, default_value_t = ModeChoice::Both)]
    mode: ModeChoice,
    #[arg(long, default_value_t = 8)]
    ttl: u32,
    #[arg(long, default_value_t = 1)]
    loop_wait: u32,
    #[arg(long, default_value_t = 3)]
    retry_timeout: u32,
    /// How long the cluster may take to become whole after the last fault heals, seconds.
    #[arg(long, default_value_t = 180)]
    recovery_secs: u64,
    #[arg(long, default_value = "target/fault-campaign")]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeChoice {
    Sync,
    Async,
    /// Each schedule's seed decides.
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum FaultKind {
    /// kill -9 of the agent alone (its postgres goes with it: parent-death signal, fence guard).
    KillAgent,
    /// kill -9 of the agent and of its postmaster.
    KillAgentAndPostmaster,
    /// Host loss: kill -9 of every process of the member at once (agent, fence guard,
    /// postgres): nothing is left to release the leader.
    KillHost,
    /// kill -9 of the postmaster alone: the agent must restart or fail over.
    KillPostmaster,
    /// SIGSTOP of the agent for `hold_ms`, then SIGCONT.
    FreezeAgent,
    /// The member's etcd connections reset and refused for `hold_ms`.
    DcsCut,
    /// The member's etcd connections silent (nothing forwarded) for `hold_ms`.
    DcsBlackHole,
    /// Every member's etcd connections silent at once: etcd unreachable.
    DcsOutage,
    /// The member's postgres unreachable for replication (and rewind, base backups).
    ReplicationCut,
    /// `POST /switchover` from the leader to a random other member.
    Switchover,
    /// `POST /failover` to a random other member.
    ManualFailover,
}

impl FaultKind {
    fn is_process_fault(self) -> bool {
        matches!(
            self,
            FaultKind::KillAgent
                | FaultKind::KillAgentAndPostmaster
                | FaultKind::KillHost
                | FaultKind::FreezeAgent
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Aim {
    Leader,
    Replica,
    Any,
}

#[derive(Debug, Clone, Serialize)]
struct Fault {
    at_ms: u64,
    hold_ms: u64,
    kind: FaultKind,
    aim: Aim,
}

#[derive(Debug, Clone, Serialize)]
struct Schedule {
    seed: u64,
    synchronous: bool,
    faults: Vec<Fault>,
}

impl Schedule {
    fn draw(seed: u64, mode: ModeChoice) -> Schedule {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let synchronous = match mode {
            ModeChoice::Sync => true,
            ModeChoice::Async => false,
            ModeChoice::Both => rng.random_bool(0.5),
        };
        // Weights: leader kills and silent partitions are what failover is for; the rest mix in.
        const KINDS: [(FaultKind, u32); 11] = [
            (FaultKind::KillAgentAndPostmaster, 2),
            (FaultKind::KillAgent, 3),
            (FaultKind::KillHost, 2),
            (FaultKind::KillPostmaster, 2),
            (FaultKind::FreezeAgent, 3),
            (FaultKind::DcsCut, 2),
            (FaultKind::DcsBlackHole, 3),
            (FaultKind::DcsOutage, 1),
            (FaultKind::ReplicationCut, 3),
            (FaultKind::Switchover, 2),
            (FaultKind::ManualFailover, 1),
        ];
        let total: u32 = KINDS.iter().map(|(_, w)| w).sum();
        let count = rng.random_range(1..=3);
        let mut faults: Vec<Fault> = (0..count)
            .map(|_| {
                let mut pick = rng.random_range(0..total);
                let kind = KINDS
                    .iter()
                    .find(|(_, w)| {
                        if pick < *w {
                            true
                        } else {
                            pick -= w;
                            false
                        }
                    })
                    .map(|(k, _)| *k)
                    .unwrap_or(FaultKind::KillAgentAndPostmaster);
                let aim = match rng.random_range(0..10) {
                    0..=5 => Aim::Leader,
                    6..=8 => Aim::Replica,
                    _ => Aim::Any,
                };
                Fault {
                    at_ms: rng.random_range(0..8_000),
                    hold_ms: rng.random_range(1_000..16_000),
                    kind,
                    aim,
                }
            })
            .collect();
        faults.sort_by_key(|f| f.at_ms);
        Schedule {
            seed,
            synchronous,
            faults,
        }
    }
}

/// What happened to one schedule.
#[derive(Debug, Clone, Serialize, Default)]
struct Outcome {
    index: u64,
    seed: u64,
    synchronous: bool,
    faults: Vec<Fault>,
    /// Per fault: the member it hit, or why it was skipped.
    applied: Vec<String>,
    injected: usize,
    failovers: usize,
    leaders: Vec<String>,
    acknowledged: usize,
    lost: Vec<i64>,
    split_brain_ticks: usize,
    split_brain: Vec<(u64, Vec<String>)>,
    whole: bool,
    recovery_s: f64,
    requests: Vec<String>,
    violations: Vec<String>,
}

/// Network faults stack: a proxy is cut while any cut is active, else silent while any black
/// hole is, else open.
#[derive(Debug, Default, Clone, Copy)]
struct ProxyFaults {
    cuts: u32,
    holes: u32,
}

impl ProxyFaults {
    fn apply(&self, proxy: &TcpProxy) {
        if self.cuts > 0 {
            proxy.cut();
        } else if self.holes > 0 {
            proxy.black_hole();
        } else {
            proxy.heal();
        }
    }
}

struct Cluster {
    env: TestEnv,
    dcs: Vec<TcpProxy>,
    replication: Vec<TcpProxy>,
    dcs_faults: Vec<ProxyFaults>,
    replication_faults: Vec<ProxyFaults>,
    /// Members whose agent was killed or frozen by a fault not yet healed.
    process_fault: Vec<bool>,
    args: Args,
}

const NAMES: [&str; 3] = ["pg0", "pg1", "pg2"];

impl Cluster {
    async fn start(args: Args) -> anyhow::Result<Cluster> {
        let options = ClusterOptions {
            scope: "campaign".into(),
            ttl: args.ttl,
            loop_wait: args.loop_wait,
            retry_timeout: args.retry_timeout,
            synchronous_mode: false,
        };
        let mut env = TestEnv::start(options).await?;
        let mut dcs = Vec::new();
        let mut replication = Vec::new();
        for name in NAMES {
            let i = env.add_member(name);
            let to_etcd = TcpProxy::start(env.etcd.endpoint()).await?;
            env.members[i].set(
                "etcd3.hosts",
                serde_yaml::Value::Sequence(vec![to_etcd.endpoint().into()]),
            );
            // Replicas, pg_rewind and base backups reach a member at its connect_address: the
            // proxy. The writer and the agent's own connections go to the real port.
            let to_postgres =
                TcpProxy::start(format!("127.0.0.1:{}", env.members[i].pg_port)).await?;
            env.members[i].set("postgresql.connect_address", to_postgres.endpoint().into());
            dcs.push(to_etcd);
            replication.push(to_postgres);
        }
        for i in 0..NAMES.len() {
            env.start_member(i)?;
        }
        let n = NAMES.len();
        let cluster = Cluster {
            env,
            dcs,
            replication,
            dcs_faults: vec![ProxyFaults::default(); n],
            replication_faults: vec![ProxyFaults::default(); n],
            process_fault: vec![false; n],
            args,
        };
        let leader = cluster.env.wait_for_leader(Duration::from_secs(180)).await;
        cluster
            .member(&leader)
            .sql(CREATE_TABLE)
            .await
            .context("create the writer table")?;
        cluster
            .member(&leader)
            .sql("CREATE TABLE IF NOT EXISTS campaign_probe (at timestamptz NOT NULL)")
            .await
            .context("create the probe table")?;
        cluster
            .wait_whole(Duration::from_secs(180))
            .await
            .map_err(|why| anyhow::anyhow!("the cluster did not bootstrap: {why}"))?;
        Ok(cluster)
    }

    fn member(&self, name: &str) -> &pgwarden_tests::harness::Member {
        &self.env.members[self.index(name)]
    }

    fn index(&self, name: &str) -> usize {
        self.env
            .members
            .iter()
            .position(|m| m.name == name)
            .unwrap_or(0)
    }

    /// One leader that holds the key, answers `/primary` and commits a write (in synchronous
    /// mode that needs its synchronous standby), and both others streaming.
    async fn is_whole(&self) -> Result<String, String> {
        let leader = self.env.leader().await.ok_or("no leader key")?;
        let m = self.member(&leader);
        if m.api_get("/primary").await.map(|(s, _)| s) != Some(200) {
            return Err(format!("{leader} holds the key but /primary is not 200"));
        }
        for r in self.env.members.iter().filter(|r| r.name != leader) {
            if !r.is_streaming_replica().await {
                return Err(format!("{} does not stream", r.name));
            }
        }
        let probe = m.sql("INSERT INTO campaign_probe VALUES (now())");
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(_)) => Ok(leader),
            Ok(Err(e)) => Err(format!("{leader} refused a write: {e:#}")),
            Err(_) => Err(format!("{leader} did not commit a write within 5 s")),
        }
    }

    async fn wait_whole(&self, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.is_whole().await {
                Ok(leader) => return Ok(leader),
                Err(why) if Instant::now() >= deadline => return Err(why),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Sets synchronous_mode through the leader's API and waits until it is in force.
    async fn set_synchronous(&self, on: bool) -> anyhow::Result<()> {
        let leader = self.env.leader().await.context("no leader")?;
        let body = format!(r#"{{"synchronous_mode": {on}}}"#);
        let (code, text) = self
            .member(&leader)
            .api_request("PATCH", "/config", Some(&body))
            .await
            .context("PATCH /config did not answer")?;
        anyhow::ensure!(code == 200, "PATCH /config: {code} {text}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let leader = self.env.leader().await.unwrap_or_default();
            let names = self
                .member(&leader)
                .sql("SHOW synchronous_standby_names")
                .await
                .unwrap_or_default();
            let sync_key = self
                .env
                .etcd
                .get(&self.env.key("sync"))
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
            let standby_named = serde_json::from_str::<serde_json::Value>(&sync_key)
                .ok()
                .and_then(|v| {
                    v.get("sync_standby")
                        .and_then(|s| s.as_str().map(str::to_owned))
                })
                .is_some();
            let in_force = if on {
                names.first().is_some_and(|n| !n.is_empty()) && standby_named
            } else {
                names.first().is_some_and(|n| n.is_empty())
            };
            if in_force {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "synchronous_mode {on} not in force after 60 s (synchronous_standby_names {names:?}, sync key {sync_key:?})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn agent_pid(&self, i: usize) -> Option<i32> {
        self.env.members[i].process.as_ref().map(|p| p.pid())
    }

    /// Picks the member a fault is aimed at, as things stand now.
    async fn aim(&self, aim: Aim, rng: &mut ChaCha8Rng) -> Option<usize> {
        let leader = self.env.leader().await;
        let leader_index = leader.as_deref().map(|l| self.index(l));
        let candidates: Vec<usize> = match aim {
            Aim::Leader => leader_index.into_iter().collect(),
            Aim::Replica => (0..NAMES.len())
                .filter(|i| Some(*i) != leader_index)
                .collect(),
            Aim::Any => (0..NAMES.len()).collect(),
        };
        if candidates.is_empty() {
            return None;
        }
        Some(candidates[rng.random_range(0..candidates.len())])
    }

    /// Injects one fault; `Err` says why it was skipped.
    async fn inject(
        &mut self,
        fault: &Fault,
        rng: &mut ChaCha8Rng,
        requests: &mut Vec<tokio::task::JoinHandle<String>>,
    ) -> Result<Option<usize>, String> {
        if fault.kind == FaultKind::DcsOutage {
            for i in 0..NAMES.len() {
                self.dcs_faults[i].holes += 1;
                self.dcs_faults[i].apply(&self.dcs[i]);
            }
            return Ok(None);
        }
        let i = self
            .aim(fault.aim, rng)
            .await
            .ok_or("nobody to aim at (no leader)")?;
        let name = NAMES[i];
        if fault.kind.is_process_fault() && self.process_fault[i] {
            return Err(format!("{name} is already killed or frozen"));
        }
        match fault.kind {
            FaultKind::KillAgent | FaultKind::KillAgentAndPostmaster | FaultKind::KillHost => {
                let m = &mut self.env.members[i];
                match fault.kind {
                    FaultKind::KillAgentAndPostmaster => m.kill9_with_postmaster(),
                    FaultKind::KillHost => m.kill9_host(),
                    _ => m.agent().kill9(),
                }
                self.process_fault[i] = true;
            }
            FaultKind::KillPostmaster => {
                let pid = self.env.members[i]
                    .postmaster_pid()
                    .ok_or(format!("{name}'s postgres is not running"))?;
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            FaultKind::FreezeAgent => {
                self.env.members[i].agent().sigstop();
                self.process_fault[i] = true;
            }
            FaultKind::DcsCut => {
                self.dcs_faults[i].cuts += 1;
                self.dcs_faults[i].apply(&self.dcs[i]);
            }
            FaultKind::DcsBlackHole => {
                self.dcs_faults[i].holes += 1;
                self.dcs_faults[i].apply(&self.dcs[i]);
            }
            FaultKind::ReplicationCut => {
                self.replication_faults[i].cuts += 1;
                self.replication_faults[i].apply(&self.replication[i]);
            }
            FaultKind::Switchover | FaultKind::ManualFailover => {
                let others: Vec<usize> = (0..NAMES.len()).filter(|o| *o != i).collect();
                let candidate = NAMES[others[rng.random_range(0..others.len())]];
                let (path, body) = if fault.kind == FaultKind::Switchover {
                    (
                        "/switchover",
                        format!(r#"{{"leader": "{name}", "candidate": "{candidate}"}}"#),
                    )
                } else {
                    ("/failover", format!(r#"{{"candidate": "{candidate}"}}"#))
                };
                let port = self.env.members[i].api_port;
                requests.push(tokio::spawn(async move {
                    let answer =
                        pgwarden_tests::harness::http_request("POST", port, path, Some(&body))
                            .await;
                    match answer {
                        Some((code, text)) => {
                            format!("{path} {name}→{candidate}: {code} {}", text.trim())
                        }
                        None => format!("{path} {name}→{candidate}: no answer"),
                    }
                }));
            }
            FaultKind::DcsOutage => {}
        }
        Ok(Some(i))
    }

    /// Undoes one injected fault (restarts a killed agent, resumes a frozen one, heals a cut).
    fn heal(&mut self, fault: &Fault, target: Option<usize>) -> anyhow::Result<()> {
        match (fault.kind, target) {
            (FaultKind::DcsOutage, _) => {
                for i in 0..NAMES.len() {
                    self.dcs_faults[i].holes = self.dcs_faults[i].holes.saturating_sub(1);
                    self.dcs_faults[i].apply(&self.dcs[i]);
                }
            }
            (
                FaultKind::KillAgent | FaultKind::KillAgentAndPostmaster | FaultKind::KillHost,
                Some(i),
            ) => {
                self.env.members[i].restart()?;
                self.process_fault[i] = false;
            }
            (FaultKind::FreezeAgent, Some(i)) => {
                self.env.members[i].agent().sigcont();
                self.process_fault[i] = false;
            }
            (FaultKind::DcsCut, Some(i)) => {
                self.dcs_faults[i].cuts = self.dcs_faults[i].cuts.saturating_sub(1);
                self.dcs_faults[i].apply(&self.dcs[i]);
            }
            (FaultKind::DcsBlackHole, Some(i)) => {
                self.dcs_faults[i].holes = self.dcs_faults[i].holes.saturating_sub(1);
                self.dcs_faults[i].apply(&self.dcs[i]);
            }
            (FaultKind::ReplicationCut, Some(i)) => {
                self.replication_faults[i].cuts = self.replication_faults[i].cuts.saturating_sub(1);
                self.replication_faults[i].apply(&self.replication[i]);
            }
            _ => {}
        }
        Ok(())
    }

    /// Leaves nothing broken: every proxy open, every agent running and resumed.
    fn heal_everything(&mut self) -> anyhow::Result<()> {
        for i in 0..NAMES.len() {
            self.dcs_faults[i] = ProxyFaults::default();
            self.dcs_faults[i].apply(&self.dcs[i]);
            self.replication_faults[i] = ProxyFaults::default();
            self.replication_faults[i].apply(&self.replication[i]);
            if let Some(pid) = self.agent_pid(i) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
            }
            let running = self.env.members[i]
                .process
                .as_mut()
                .is_some_and(|p| p.is_running());
            if !running {
                self.env.members[i].restart()?;
            }
            self.process_fault[i] = false;
        }
        Ok(())
    }

    /// Acknowledged ids missing from the leader.
    async fn missing(&self, leader: &str, acks: &[Ack]) -> anyhow::Result<Vec<i64>> {
        let client = self.member(leader).connect().await?;
        let ids: Vec<i64> = acks.iter().map(|a| a.id).collect();
        let mut present = std::collections::HashSet::new();
        for chunk in ids.chunks(5_000) {
            let rows = client
                .query(
                    "SELECT id FROM pgwarden_writer WHERE id = ANY($1)",
                    &[&chunk.to_vec()],
                )
                .await?;
            present.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
        }
        Ok(ids.into_iter().filter(|id| !present.contains(id)).collect())
    }

    fn save_logs(&self, dir: &Path) {
        let _ = std::fs::create_dir_all(dir);
        for m in &self.env.members {
            let _ = std::fs::write(dir.join(format!("{}.log", m.name)), m.log_tail(3_000));
        }
        let _ = std::fs::write(dir.join("etcd.log"), self.env.etcd.process.log_tail(300));
    }

    async fn run(&mut self, index: u64, schedule: &Schedule) -> anyhow::Result<Outcome> {
        let mut outcome = Outcome {
            index,
            seed: schedule.seed,
            synchronous: schedule.synchronous,
            faults: schedule.faults.clone(),
            ..Default::default()
        };
        self.set_synchronous(schedule.synchronous).await?;
        let leaders = watch_leader(&self.env).await?;
        let writer = Writer::start(self.env.writer_targets());
        tokio::time::sleep(Duration::from_secs(1)).await;

        // Injections and heals in time order; the member a fault hits is chosen when it starts.
        let mut rng = ChaCha8Rng::seed_from_u64(schedule.seed ^ 0x5eed);
        let mut events: Vec<(u64, bool, usize)> = Vec::new();
        for (n, f) in schedule.faults.iter().enumerate() {
            events.push((f.at_ms, true, n));
            events.push((f.at_ms + f.hold_ms, false, n));
        }
        events.sort();
        let start = tokio::time::Instant::now();
        let mut targets: Vec<Option<Result<Option<usize>, String>>> =
            vec![None; schedule.faults.len()];
        let mut requests = Vec::new();
        for (at, inject, n) in events {
            tokio::time::sleep_until(start + Duration::from_millis(at)).await;
            let fault = &schedule.faults[n];
            if inject {
                let result = self.inject(fault, &mut rng, &mut requests).await;
                if result.is_ok() {
                    outcome.injected += 1;
                }
                targets[n] = Some(result);
            } else if let Some(Ok(target)) = &targets[n] {
                self.heal(fault, *target)?;
            }
        }
        outcome.applied = targets
            .iter()
            .map(|t| match t {
                Some(Ok(Some(i))) => NAMES[*i].to_owned(),
                Some(Ok(None)) => "all".to_owned(),
                Some(Err(why)) => format!("skipped: {why}"),
                None => "skipped".to_owned(),
            })
            .collect();
        self.heal_everything()?;

        let healed = Instant::now();
        let timeout = Duration::from_secs(self.args.recovery_secs);
        let whole = self.wait_whole(timeout).await;
        outcome.recovery_s = healed.elapsed().as_secs_f64();
        // Writes keep going a moment on the whole cluster, so the last failover's new leader
        // has acknowledged some before the record is checked.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let acks = writer.stop().await;
        for r in requests {
            outcome.requests.push(
                r.await
                    .unwrap_or_else(|e| format!("request task failed: {e}")),
            );
        }
        let history = leaders.stop();
        outcome.leaders = history
            .iter()
            .map(|l| l.clone().unwrap_or("-".into()))
            .collect();
        outcome.failovers = count_failovers(&history);
        outcome.acknowledged = acks.len();
        outcome.split_brain = split_brain_ticks(&acks);
        outcome.split_brain_ticks = outcome.split_brain.len();
        if !outcome.split_brain.is_empty() {
            outcome.violations.push(format!(
                "split brain: two members acknowledged in the same tick {} times",
                outcome.split_brain.len()
            ));
        }
        match whole {
            Ok(leader) => {
                outcome.whole = true;
                outcome.lost = self.missing(&leader, &acks).await?;
                if schedule.synchronous && !outcome.lost.is_empty() {
                    outcome.violations.push(format!(
                        "synchronous mode lost {} acknowledged writes",
                        outcome.lost.len()
                    ));
                }
            }
            Err(why) => outcome.violations.push(format!(
                "not whole {} s after the last fault healed: {why}",
                self.args.recovery_secs
            )),
        }
        Ok(outcome)
    }
}

/// The leader key's holders over time, from a watch (a poll could miss a short-lived holder).
struct LeaderWatch {
    history: Arc<Mutex<Vec<Option<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaderWatch {
    fn stop(self) -> Vec<Option<String>> {
        self.task.abort();
        self.history.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

async fn watch_leader(env: &TestEnv) -> anyhow::Result<LeaderWatch> {
    let key = env.key("leader");
    let mut client = etcd_client::Client::connect([env.etcd.endpoint()], None).await?;
    let response = client.get(key.as_str(), None).await?;
    let current = response
        .kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
    let history = Arc::new(Mutex::new(vec![current]));
    // From the revision read, so no change between the read and the watch is missed.
    let from = response.header().map_or(0, |h| h.revision()) + 1;
    let options = etcd_client::WatchOptions::new().with_start_revision(from);
    let mut stream = client.watch(key.as_str(), Some(options)).await?;
    let record = history.clone();
    let task = tokio::spawn(async move {
        while let Ok(Some(response)) = stream.message().await {
            for event in response.events() {
                let holder = match event.event_type() {
                    etcd_client::EventType::Put => event
                        .kv()
                        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                    etcd_client::EventType::Delete => None,
                };
                if let Ok(mut h) = record.lock() {
                    if h.last() != Some(&holder) {
                        h.push(holder);
                    }
                }
            }
        }
    });
    Ok(LeaderWatch { history, task })
}

/// Changes of the leader key from one member to another (through an empty key or not).
fn count_failovers(history: &[Option<String>]) -> usize {
    let holders: Vec<&String> = history.iter().flatten().collect();
    holders.windows(2).filter(|w| w[0] != w[1]).count()
}

#[derive(Debug, Serialize, Default)]
struct Summary {
    started: String,
    machine: String,
    first_seed: u64,
    ttl: u32,
    loop_wait: u32,
    retry_timeout: u32,
    schedules: usize,
    synchronous_schedules: usize,
    faults_injected: usize,
    faults_skipped: usize,
    injected_by_kind: BTreeMap<String, usize>,
    failovers: usize,
    acknowledged_writes: usize,
    lost_acknowledged_writes_synchronous: usize,
    lost_acknowledged_writes_asynchronous: usize,
    split_brain_ticks: usize,
    not_whole: usize,
    schedules_with_violations: Vec<u64>,
    recovery_s_median: f64,
    recovery_s_max: f64,
    elapsed_s: f64,
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024 / 1024);
    let os = std::fs::read_to_string("/etc/debian_version").unwrap_or_default();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_owned()))
        })
        .unwrap_or_default();
    format!("{cpus} CPUs ({model}), {mem} GiB, Debian {}", os.trim())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let first_seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    let out = args.out.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let schedules = args.schedules;
    let mode = args.mode;
    let mut summary = Summary {
        started: chrono::Utc::now().to_rfc3339(),
        machine: machine(),
        first_seed,
        ttl: args.ttl,
        loop_wait: args.loop_wait,
        retry_timeout: args.retry_timeout,
        ..Default::default()
    };
    eprintln!(
        "fault-campaign: {schedules} schedules from seed {first_seed} (replay one: --seed <seed> --schedules 1)"
    );
    let began = Instant::now();
    let mut cluster = Cluster::start(args).await?;
    let mut lines = String::new();
    let mut recoveries = Vec::new();
    let mut aborted = None;
    for index in 0..schedules {
        let schedule = Schedule::draw(first_seed.wrapping_add(index), mode);
        let result = tokio::select! {
            r = cluster.run(index, &schedule) => r,
            _ = tokio::signal::ctrl_c() => {
                aborted = Some("interrupted".to_owned());
                break;
            }
        };
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                // The harness itself failed (e.g. synchronous mode never took effect): keep the
                // logs and stop, the cluster's state is unknown.
                cluster.save_logs(&out.join(format!("schedule-{index}")));
                aborted = Some(format!("schedule {index} (seed {}): {e:#}", schedule.seed));
                break;
            }
        };
        eprintln!(
            "schedule {index} seed {} {}: {} faults [{}] → {} failovers, {} acks, {} lost, {} split-brain ticks, whole after {:.1} s{}",
            outcome.seed,
            if outcome.synchronous { "sync" } else { "async" },
            outcome.injected,
            outcome
                .faults
                .iter()
                .zip(&outcome.applied)
                .map(|(f, a)| format!("{:?}@{}ms/{}ms→{a}", f.kind, f.at_ms, f.hold_ms))
                .collect::<Vec<_>>()
                .join(", "),
            outcome.failovers,
            outcome.acknowledged,
            outcome.lost.len(),
            outcome.split_brain_ticks,
            outcome.recovery_s,
            if outcome.violations.is_empty() {
                String::new()
            } else {
                format!(" — VIOLATED: {}", outcome.violations.join("; "))
            }
        );
        summary.schedules += 1;
        summary.synchronous_schedules += usize::from(outcome.synchronous);
        summary.faults_injected += outcome.injected;
        summary.faults_skipped += outcome.faults.len() - outcome.injected;
        for (f, a) in outcome.faults.iter().zip(&outcome.applied) {
            if !a.starts_with("skipped") {
                *summary
                    .injected_by_kind
                    .entry(format!("{:?}", f.kind))
                    .or_default() += 1;
            }
        }
        summary.failovers += outcome.failovers;
        summary.acknowledged_writes += outcome.acknowledged;
        if outcome.synchronous {
            summary.lost_acknowledged_writes_synchronous += outcome.lost.len();
        } else {
            summary.lost_acknowledged_writes_asynchronous += outcome.lost.len();
        }
        summary.split_brain_ticks += outcome.split_brain_ticks;
        summary.not_whole += usize::from(!outcome.whole);
        recoveries.push(outcome.recovery_s);
        if !outcome.violations.is_empty() {
            summary.schedules_with_violations.push(index);
            cluster.save_logs(&out.join(format!("schedule-{index}")));
        }
        lines.push_str(&serde_json::to_string(&outcome)?);
        lines.push('\n');
        std::fs::write(out.join("schedules.jsonl"), &lines)?;
        if !outcome.whole {
            // Give it one more chance with everything healed; a cluster that stays broken
            // would only turn every later schedule into the same failure.
            if let Err(why) = cluster.wait_whole(Duration::from_secs(180)).await {
                aborted = Some(format!(
                    "the cluster stayed broken after schedule {index}: {why}"
                ));
                break;
            }
        }
    }
    recoveries.sort_by(f64::total_cmp);
    summary.recovery_s_median = recoveries.get(recoveries.len() / 2).copied().unwrap_or(0.0);
    summary.recovery_s_max = recoveries.last().copied().unwrap_or(0.0);
    summary.elapsed_s = began.elapsed().as_secs_f64();
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if let Some(why) = &aborted {
        eprintln!("fault-campaign: stopped early: {why}");
    }
    let violated = !summary.schedules_with_violations.is_empty();
    drop(cluster);
    if violated || aborted.is_some() {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_draws_the_same_schedule() {
        let a = serde_json::to_string(&Schedule::draw(42, ModeChoice::Both)).unwrap_or_default();
        let b = serde_json::to_string(&Schedule::draw(42, ModeChoice::Both)).unwrap_or_default();
        assert!(!a.is_empty());
        assert_eq!(a, b);
        assert_ne!(
            a,
            serde_json::to_string(&Schedule::draw(43, ModeChoice::Both)).unwrap_or_default()
        );
    }

    #[test]
    fn schedules_are_sorted_bounded_and_honour_the_mode() {
        for seed in 0..200 {
            let s = Schedule::draw(seed, ModeChoice::Sync);
            assert!(s.synchronous);
            assert!((1..=3).contains(&s.faults.len()));
            assert!(s.faults.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
            assert!(s.faults.iter().all(|f| f.hold_ms >= 1_000));
            assert!(!Schedule::draw(seed, ModeChoice::Async).synchronous);
        }
    }

    #[test]
    fn a_failover_is_a_change_of_holder_through_an_empty_key_or_not() {
        let h = |v: &[Option<&str>]| v.iter().map(|x| x.map(str::to_owned)).collect::<Vec<_>>();
        assert_eq!(count_failovers(&h(&[Some("a")])), 0);
        assert_eq!(count_failovers(&h(&[Some("a"), None, Some("a")])), 0);
        assert_eq!(count_failovers(&h(&[Some("a"), None, Some("b")])), 1);
        assert_eq!(
            count_failovers(&h(&[Some("a"), Some("b"), None, Some("c")])),
            2
        );
    }
}
