//! The simulated world: the DCS store, the postgres instances, the network and the clocks.
//!
//! Time is one global counter of microseconds ([`Us`]); the store runs on it. Every member has
//! its own clock that runs at a fixed rate drift from the global one (bounded by the fence
//! policy's `max_clock_drift`), and the agent only ever sees its own clock.
//!
//! WAL is modelled as a list of entry ids: a member's position is the list's length times
//! [`ENTRY_BYTES`], two members agree on a position exactly when their lists agree up to it, and
//! a diverged former primary is one whose list is not a prefix of its new leader's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwarden::dcs::{
    ClusterView, FailoverRequest, HistoryLine, LeaderKey, LeaderStatus, Member, MemberRecord,
    SyncState, Versioned,
};
use pgwarden::postgres::controldata::ClusterState;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Global simulated time in microseconds.
pub type Us = u64;

pub const MS: Us = 1_000;
pub const SEC: Us = 1_000_000;
/// The period of the world's own processes (replication, client writes, postgres transitions).
pub const TICK: Us = 100 * MS;
/// Bytes one WAL entry stands for (one client write, or the end-of-recovery record).
pub const ENTRY_BYTES: u64 = 16 * 1024;
/// Where WAL positions start (as `0/1000000`), so that position 0 is never a real one.
pub const WAL_BASE: u64 = 0x100_0000;
/// The cluster's system identifier.
pub const SYSID: &str = "7300000000000000001";

/// An entry id that is not a client write: the end-of-recovery record of a promotion.
pub const MARKER: u64 = 1 << 63;

/// A lease in the store.
#[derive(Debug, Clone)]
pub struct Lease {
    pub owner: usize,
    pub expires: Us,
    pub ttl: Us,
}

/// The DCS: Patroni's keys, leases with a TTL, revisions for compare-and-set.
#[derive(Debug, Default)]
pub struct Store {
    pub rev: i64,
    pub initialize: Option<Versioned<String>>,
    pub config: Option<Versioned<serde_json::Value>>,
    pub leader: Option<LeaderKey>,
    pub members: BTreeMap<String, Member>,
    pub status: Option<LeaderStatus>,
    /// Raw `failover`: cleared requests stay as an empty value with a revision, as in etcd.
    pub failover: Option<Versioned<FailoverRequest>>,
    pub sync: Option<Versioned<SyncState>>,
    pub history: Vec<HistoryLine>,
    /// The `failsafe` topology the leader publishes (failsafe mode).
    pub failsafe: Option<BTreeMap<String, String>>,
    pub leases: BTreeMap<i64, Lease>,
    pub next_lease: i64,
    /// Members whose leader key a dead agent's release removed, for the checker.
    pub released: Vec<String>,
    /// Set when a watched key changed; the scheduler wakes the idle agents.
    pub changed: bool,
}

impl Store {
    pub(crate) fn bump(&mut self) -> i64 {
        self.rev += 1;
        self.changed = true;
        self.rev
    }

    pub fn set_initialize(&mut self, value: String) {
        let revision = self.bump();
        self.initialize = Some(Versioned { value, revision });
    }

    /// Deletes the keys of leases that expired by `now`.
    pub fn expire(&mut self, now: Us) {
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.drop_lease(id);
        }
    }

    fn drop_lease(&mut self, id: i64) {
        self.leases.remove(&id);
        if self.leader.as_ref().is_some_and(|l| l.lease == id) {
            self.leader = None;
            self.bump();
        }
        let gone: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.lease == id)
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            self.members.remove(&n);
            self.bump();
        }
    }

    pub fn view(&self) -> ClusterView {
        ClusterView {
            initialize: self.initialize.clone(),
            config: self.config.clone(),
            leader: self.leader.clone(),
            members: self.members.values().cloned().collect(),
            status: self.status.clone(),
            failover: self
                .failover
                .clone()
                .filter(|f| f.value.leader.is_some() || f.value.member.is_some()),
            sync: self.sync.clone(),
            history: self.history.clone(),
            failsafe: self.failsafe.clone(),
            revision: self.rev,
        }
    }

    pub fn grant(&mut self, owner: usize, ttl: Us, now: Us) -> i64 {
        self.next_lease += 1;
        let id = self.next_lease;
        self.leases.insert(
            id,
            Lease {
                owner,
                expires: now + ttl,
                ttl,
            },
        );
        id
    }

    /// Refreshes a lease; `None` when it no longer exists.
    pub fn keepalive(&mut self, id: i64, now: Us) -> Option<Us> {
        let lease = self.leases.get_mut(&id)?;
        lease.expires = now + lease.ttl;
        Some(lease.ttl)
    }

    pub fn revoke(&mut self, id: i64) {
        if self.leases.contains_key(&id) {
            self.drop_lease(id);
        }
    }

    pub fn put_leader(&mut self, name: &str, lease: i64) {
        let revision = self.bump();
        self.leader = Some(LeaderKey {
            name: name.to_owned(),
            revision,
            lease,
        });
    }

    pub fn put_member(&mut self, name: &str, record: MemberRecord, lease: i64) {
        if self
            .members
            .get(name)
            .is_some_and(|m| m.record == record && m.lease == lease)
        {
            return;
        }
        let revision = self.bump();
        self.members.insert(
            name.to_owned(),
            Member {
                name: name.to_owned(),
                record,
                revision,
                lease,
            },
        );
    }

    pub fn put_config(&mut self, value: serde_json::Value) {
        let revision = self.bump();
        self.config = Some(Versioned { value, revision });
    }

    /// Compare-and-set of `failover`; `expected` 0 means "absent".
    pub fn put_failover(&mut self, request: FailoverRequest, expected: Option<i64>) -> bool {
        let current = self.failover.as_ref().map(|f| f.revision).unwrap_or(0);
        if expected.is_some_and(|e| e != current) {
            return false;
        }
        let revision = self.bump();
        self.failover = Some(Versioned {
            value: request,
            revision,
        });
        true
    }

    pub fn put_sync(&mut self, sync: Option<SyncState>, expected: Option<i64>) -> bool {
        let current = self.sync.as_ref().map(|f| f.revision).unwrap_or(0);
        if expected.is_some_and(|e| e != current) {
            return false;
        }
        let revision = self.bump();
        self.sync = sync.map(|value| Versioned { value, revision });
        true
    }

    pub fn put_status(&mut self, status: LeaderStatus) {
        self.bump();
        self.status = Some(status);
    }

    pub fn put_history(&mut self, history: Vec<HistoryLine>) {
        self.bump();
        self.history = history;
    }

    pub fn put_failsafe(&mut self, topology: BTreeMap<String, String>) {
        self.bump();
        self.failsafe = Some(topology);
    }
}

/// The postmaster's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgRun {
    Down,
    /// Started; accepts connections at `ready_at`.
    Starting {
        ready_at: Us,
    },
    Running,
    /// Exited on its own (crash): the supervisor reports it until the next start.
    Crashed,
}

/// One simulated postgres instance and its data directory.
#[derive(Debug, Clone)]
pub struct Pg {
    /// The data directory exists (initdb or a clone has run).
    pub initialized: bool,
    pub run: PgRun,
    /// Running in recovery (a standby); only meaningful while running.
    pub in_recovery: bool,
    /// `standby.signal` in the data directory: the next start is a standby.
    pub standby_signal: bool,
    /// The control file's state, for `pg_controldata`.
    pub control: ClusterState,
    pub wal: Vec<u64>,
    pub timeline: u32,
    /// Timeline switches in this data directory's history: (old timeline, switch position).
    pub tl_history: Vec<(u32, u64)>,
    /// `primary_conninfo` points at this member.
    pub upstream: Option<usize>,
    /// `synchronous_standby_names` postgres runs with.
    pub sync_names: String,
    /// The member it is streaming from right now (computed every tick).
    pub streaming_from: Option<usize>,
    /// `pg_promote()` was called; recovery ends at this instant.
    pub promote_at: Option<Us>,
    /// Client writes waiting for a synchronous standby: (entry index, id).
    pub pending: Vec<(usize, u64)>,
    /// When the postmaster was last started (tells a dying one from its successor).
    pub started_at: Us,
}

impl Pg {
    pub fn empty() -> Self {
        Pg {
            initialized: false,
            run: PgRun::Down,
            in_recovery: false,
            standby_signal: false,
            control: ClusterState::ShutDown,
            wal: Vec::new(),
            timeline: 1,
            tl_history: Vec::new(),
            upstream: None,
            sync_names: String::new(),
            streaming_from: None,
            promote_at: None,
            pending: Vec::new(),
            started_at: 0,
        }
    }

    /// Running and out of recovery: it would acknowledge a write.
    pub fn writable(&self) -> bool {
        self.run == PgRun::Running && !self.in_recovery
    }

    pub fn position(&self) -> u64 {
        WAL_BASE + self.wal.len() as u64 * ENTRY_BYTES
    }

    pub fn is_up(&self) -> bool {
        matches!(self.run, PgRun::Running | PgRun::Starting { .. })
    }

    /// Postgres stopped; `clean` is a shutdown checkpoint, otherwise the control file says it
    /// crashed. Waiting client writes fail.
    pub fn stop(&mut self, clean: bool) {
        let standby = self.standby_signal || (self.run == PgRun::Running && self.in_recovery);
        self.run = PgRun::Down;
        self.promote_at = None;
        self.streaming_from = None;
        self.pending.clear();
        self.control = match (clean, standby) {
            (true, false) => ClusterState::ShutDown,
            (true, true) => ClusterState::ShutDownInRecovery,
            (false, false) => ClusterState::InProduction,
            (false, true) => ClusterState::InArchiveRecovery,
        };
    }

    /// How many listed standbys a commit waits for (`N (…)`, `ANY N (…)`; 1 for `*` or a bare
    /// list), and whether they are quorum standbys (`ANY`).
    pub fn sync_wait(&self) -> (usize, bool) {
        pgwarden::ha::sync::parse_standby_setting(&self.sync_names)
            .map(|s| (s.num as usize, s.any))
            .unwrap_or((1, false))
    }

    /// Names in `synchronous_standby_names`; `*` matches any standby.
    pub fn sync_listed(&self, name: &str) -> bool {
        // The agent's reader, so `N (a,b)` and quoted names mean here what they mean to it.
        pgwarden::ha::sync::parse_standby_names(&self.sync_names)
            .unwrap_or_default()
            .iter()
            .any(|n| n.matches(name))
    }
}

/// A member's clock: `local = offset + global · (1 + drift)`.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub offset: Us,
    pub drift: f64,
}

impl Clock {
    pub fn local(&self, global: Us) -> Us {
        self.offset + (global as f64 * (1.0 + self.drift)) as Us
    }

    /// The first global instant at which the local clock shows at least `local`.
    pub fn global(&self, local: Us) -> Us {
        let g = (local.saturating_sub(self.offset) as f64 / (1.0 + self.drift)) as Us;
        let mut g = g.saturating_sub(2);
        while self.local(g) < local {
            g += 1;
        }
        g
    }

    /// Global duration of a local one.
    pub fn global_len(&self, local: Us) -> Us {
        (local as f64 / (1.0 + self.drift)).ceil() as Us
    }
}

/// Member tags that matter to the HA decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tags {
    pub nofailover: bool,
    pub failover_priority: i64,
}

/// One machine: the agent process, its postgres, its clock and the faults it suffers.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub tags: Tags,
    pub clock: Clock,
    pub pg: Pg,
    /// The agent process runs (it may be frozen).
    pub alive: bool,
    /// Restart the crashed agent at this instant.
    pub restart_at: Option<Us>,
    /// SIGSTOP until this instant.
    pub frozen_until: Us,
    /// The fence deadline (local clock), as the supervisor and the fence guard hold it.
    pub fence: Option<Us>,
    /// The DCS cannot be reached from this member until this instant.
    pub dcs_cut_until: Us,
    /// Replication to or from this member is cut until this instant.
    pub repl_cut_until: Us,
    /// Wake the agent task at this instant.
    pub wake_at: Us,
    /// The agent waits between cycles (a watch event ends the wait).
    pub idle: bool,
    pub woken: bool,
    /// Incremented on every agent start, so a restarted agent's lease is a new one.
    pub incarnation: u32,
    /// The agent's last decision: automatic (not a requested switchover), and its sentence.
    pub last_decision: (bool, String),
    /// The release token the agent's DCS client last gave its fence guard.
    pub guard_token: Option<crate::guard::Token>,
    /// The fence guard at work after the agent was killed; a restarted agent waits for it.
    pub guard: Option<crate::guard::Guard>,
    /// The postgres of a killed agent, until it is gone.
    pub dying: Option<crate::guard::Dying>,
    /// Failsafe mode's state of the running agent process (its REST API answers
    /// `POST /failsafe` with it); a new one for each agent start.
    pub failsafe: std::sync::Arc<pgwarden::ha::failsafe::Failsafe>,
}

impl Node {
    pub fn local_now(&self, now: Us) -> Us {
        self.clock.local(now)
    }
}

/// A client write that a primary acknowledged.
#[derive(Debug, Clone)]
pub struct Acked {
    pub id: u64,
    pub index: usize,
    pub node: usize,
    pub at: Us,
    /// Acknowledged only after a synchronous standby had it.
    pub via_sync: bool,
}

/// Something worth a line in the trace.
pub struct Trace {
    pub enabled: bool,
    pub lines: Vec<String>,
}

/// Everything the simulation shares between the scheduler and the agents.
pub struct World {
    pub now: Us,
    pub base: Instant,
    pub rng: ChaCha8Rng,
    pub store: Store,
    pub nodes: Vec<Node>,
    /// Pairs of members that cannot reach each other until the instant.
    pub partitions: BTreeMap<(usize, usize), Us>,
    pub dcs_down_until: Us,
    pub next_write: u64,
    pub acked: Vec<Acked>,
    pub trace: Trace,
    /// Events the agents report for the invariant checker.
    pub events: Vec<Event>,
    /// The cluster's `bootstrap.dcs`.
    pub initial: Initial,
    /// Faults have stopped: no more slow DCS requests either.
    pub quiet: bool,
    /// The highest timeline any member has used: a promotion takes the next one, as postgres
    /// does when every history file reaches the WAL archive.
    pub max_timeline: u32,
    /// The DCS the cluster runs on, for the fence guard's release.
    pub release_style: crate::guard::Style,
    /// Fence guards' release requests that timed out and reach the store later.
    pub late: Vec<crate::guard::Late>,
    /// The guards' own random stream, so that the draws of `rng` stay as recorded seeds had
    /// them until a guard acts.
    pub guard_rng: ChaCha8Rng,
}

/// `bootstrap.dcs` of the simulated cluster.
#[derive(Debug, Clone, Copy)]
pub struct Initial {
    pub ttl: u64,
    pub loop_wait: u64,
    pub retry_timeout: u64,
    pub maximum_lag_on_failover: u64,
    pub synchronous_mode: bool,
    pub strict: bool,
    /// Synchronous mode as quorum commit (`synchronous_mode: quorum`).
    pub quorum: bool,
    pub synchronous_node_count: u32,
    /// `failsafe_mode`.
    pub failsafe_mode: bool,
}

impl Initial {
    /// The `synchronous_mode` value for on or off.
    pub fn synchronous_mode_value(&self, on: bool) -> serde_json::Value {
        match (on, self.quorum) {
            (false, _) => false.into(),
            (true, false) => true.into(),
            (true, true) => "quorum".into(),
        }
    }

    pub fn config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ttl": self.ttl,
            "loop_wait": self.loop_wait,
            "retry_timeout": self.retry_timeout,
            "maximum_lag_on_failover": self.maximum_lag_on_failover,
            "synchronous_mode": self.synchronous_mode_value(self.synchronous_mode),
            "synchronous_mode_strict": self.strict,
            "synchronous_node_count": self.synchronous_node_count,
            "failsafe_mode": self.failsafe_mode,
            "postgresql": {"use_pg_rewind": true, "use_slots": true},
        })
    }
}

/// What an agent did that the checker must look at.
#[derive(Debug, Clone)]
pub enum Event {
    /// The member is about to make postgres a primary (promote or start as primary).
    OpensForWrites {
        node: usize,
        automatic: bool,
        outcome: String,
    },
    /// The agent hit `Action::Fatal`.
    Fatal { node: usize, reason: String },
}

impl World {
    pub fn log(&mut self, line: impl FnOnce() -> String) {
        if self.trace.enabled {
            let text = format!("{:>9.3}s {}", self.now as f64 / SEC as f64, line());
            self.trace.lines.push(text);
        }
    }

    pub fn instant(&self, local: Us) -> Instant {
        self.base + Duration::from_micros(local)
    }

    pub fn local_of_instant(&self, i: Instant) -> Us {
        i.saturating_duration_since(self.base).as_micros() as Us
    }

    pub fn wall(&self, local: Us) -> chrono::DateTime<chrono::Utc> {
        let epoch = chrono::DateTime::from_timestamp(1_780_000_000, 0).unwrap_or_default();
        epoch + chrono::Duration::microseconds(local as i64)
    }

    pub fn reaches_dcs(&self, node: usize) -> bool {
        self.now >= self.dcs_down_until && self.now >= self.nodes[node].dcs_cut_until
    }

    pub fn linked(&self, a: usize, b: usize) -> bool {
        let key = (a.min(b), a.max(b));
        self.partitions
            .get(&key)
            .is_none_or(|until| self.now >= *until)
    }

    /// Can `node` stream WAL from `from` right now?
    pub fn can_stream(&self, node: usize, from: usize) -> bool {
        self.linked(node, from)
            && self.now >= self.nodes[node].repl_cut_until
            && self.now >= self.nodes[from].repl_cut_until
    }

    pub fn chance(&mut self, p: f64) -> bool {
        chance(&mut self.rng, p)
    }

    pub fn between(&mut self, lo: Us, hi: Us) -> Us {
        between(&mut self.rng, lo, hi)
    }

    /// [`World::chance`] for the fence guards, on their own stream.
    pub fn guard_chance(&mut self, p: f64) -> bool {
        chance(&mut self.guard_rng, p)
    }

    /// [`World::between`] for the fence guards, on their own stream.
    pub fn guard_between(&mut self, lo: Us, hi: Us) -> Us {
        between(&mut self.guard_rng, lo, hi)
    }

    /// The store's view of the dynamic configuration.
    pub fn config_value(&self, key: &str) -> Option<&serde_json::Value> {
        self.store.config.as_ref().and_then(|c| c.value.get(key))
    }

    pub fn synchronous_mode(&self) -> bool {
        pgwarden::config::SynchronousMode::of_config(self.config_value("synchronous_mode")).is_on()
    }

    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// One tick of the world's own processes: postgres start/promotion, replication, client
    /// writes and their acknowledgements.
    pub fn tick(&mut self) {
        let now = self.now;
        for i in 0..self.nodes.len() {
            let pg = &mut self.nodes[i].pg;
            if let PgRun::Starting { ready_at } = pg.run {
                if now >= ready_at {
                    pg.run = PgRun::Running;
                    pg.in_recovery = pg.standby_signal;
                    pg.control = if pg.in_recovery {
                        ClusterState::InArchiveRecovery
                    } else {
                        ClusterState::InProduction
                    };
                    let (name, rec) = (self.nodes[i].name.clone(), self.nodes[i].pg.in_recovery);
                    self.log(|| format!("{name}: postgres accepts connections (recovery {rec})"));
                }
            }
            let pg = &mut self.nodes[i].pg;
            if pg.promote_at.is_some_and(|t| now >= t) && pg.run == PgRun::Running {
                pg.promote_at = None;
                pg.in_recovery = false;
                pg.standby_signal = false;
                pg.control = ClusterState::InProduction;
                let at = pg.position();
                pg.tl_history.push((pg.timeline, at));
                self.max_timeline = self.max_timeline.max(pg.timeline) + 1;
                pg.timeline = self.max_timeline;
                pg.wal.push(MARKER | self.next_write);
                self.next_write += 1;
                let (name, tl) = (self.nodes[i].name.clone(), self.nodes[i].pg.timeline);
                self.log(|| format!("{name}: promoted, timeline {tl}"));
            }
        }
        self.replicate();
        self.client_writes();
    }

    /// Standbys stream from their upstream when their WAL is a prefix of it.
    pub fn replicate(&mut self) {
        for i in 0..self.nodes.len() {
            let pg = &self.nodes[i].pg;
            let streaming = match pg.upstream {
                Some(u)
                    if pg.run == PgRun::Running
                        && pg.in_recovery
                        && u != i
                        && self.nodes[u].pg.run == PgRun::Running
                        && self.can_stream(i, u) =>
                {
                    let src = &self.nodes[u].pg.wal;
                    let mine = &pg.wal;
                    (mine.len() <= src.len() && src[..mine.len()] == mine[..]).then_some(u)
                }
                _ => None,
            };
            let prev = self.nodes[i].pg.streaming_from;
            self.nodes[i].pg.streaming_from = streaming;
            if prev != streaming {
                let name = self.nodes[i].name.clone();
                self.log(|| format!("{name}: streaming from {streaming:?}"));
            }
            if let Some(u) = streaming {
                // Lag: most ticks a standby catches up fully, some ticks it stays behind.
                if self.rng.random_bool(0.7) {
                    let (dst, src) = pair(&mut self.nodes, i, u);
                    let from = dst.pg.wal.len();
                    dst.pg.wal.extend_from_slice(&src.pg.wal[from..]);
                    if dst.pg.timeline != src.pg.timeline {
                        dst.pg.timeline = src.pg.timeline;
                        dst.pg.tl_history = src.pg.tl_history.clone();
                    }
                }
            }
        }
    }

    /// Catch every streaming standby of `primary` up fully (a clean shutdown waits for its
    /// WAL senders).
    pub fn flush_to_standbys(&mut self, primary: usize) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].pg.streaming_from == Some(primary) && self.can_stream(i, primary) {
                let src = self.nodes[primary].pg.wal.clone();
                let tl = self.nodes[primary].pg.timeline;
                let hist = self.nodes[primary].pg.tl_history.clone();
                let pg = &mut self.nodes[i].pg;
                if pg.wal.len() <= src.len() && src[..pg.wal.len()] == pg.wal[..] {
                    pg.wal = src;
                    pg.timeline = tl;
                    pg.tl_history = hist;
                }
            }
        }
    }

    /// Every writable primary gets client writes; a write is acknowledged at once without
    /// synchronous standbys, or once a standby listed in `synchronous_standby_names` has it.
    fn client_writes(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].pg.writable() {
                continue;
            }
            if self.rng.random_bool(0.8) {
                let id = self.next_write;
                self.next_write += 1;
                let pg = &mut self.nodes[i].pg;
                pg.wal.push(id);
                pg.pending.push((pg.wal.len() - 1, id));
            }
            let sync_names = self.nodes[i].pg.sync_names.clone();
            let sync_on = self.synchronous_mode();
            let pending = std::mem::take(&mut self.nodes[i].pg.pending);
            let mut still = Vec::new();
            // `N (…)` waits for the first N connected by priority, `ANY N (…)` for any N: both
            // are modelled as any N, which acknowledges no later than postgres would.
            let (need, _) = self.nodes[i].pg.sync_wait();
            for (index, id) in pending {
                let waits = !sync_names.trim().is_empty();
                let have = (0..self.nodes.len())
                    .filter(|&s| {
                        s != i
                            && self.nodes[s].pg.streaming_from == Some(i)
                            && self.nodes[i].pg.sync_listed(&self.nodes[s].name)
                            && self.nodes[s].pg.wal.get(index) == Some(&id)
                    })
                    .count();
                let acked = !waits || have >= need.max(1);
                if acked {
                    self.acked.push(Acked {
                        id,
                        index,
                        node: i,
                        at: self.now,
                        // Synchronous mode's promise covers writes acknowledged while it is on.
                        via_sync: waits && sync_on,
                    });
                } else {
                    still.push((index, id));
                }
            }
            self.nodes[i].pg.pending = still;
        }
    }

    /// `pg_stat_replication` of member `i`.
    pub fn replication_rows(&self, i: usize) -> Vec<pgwarden::state::ReplicationRow> {
        let pg = &self.nodes[i].pg;
        let mut star_used = false;
        let mut rows = Vec::new();
        for (s, node) in self.nodes.iter().enumerate() {
            if node.pg.streaming_from != Some(i) {
                continue;
            }
            let listed = pg.sync_listed(&node.name);
            let (_, any) = pg.sync_wait();
            let star = pg.sync_names.trim() == "*";
            let sync = listed && (!star || !star_used);
            if star && sync {
                star_used = true;
            }
            let _ = s;
            rows.push(pgwarden::state::ReplicationRow {
                usename: "replicator".into(),
                application_name: node.name.clone(),
                client_addr: None,
                state: "streaming".into(),
                sync_state: if any && listed {
                    "quorum"
                } else if sync {
                    "sync"
                } else if listed {
                    "potential"
                } else {
                    "async"
                }
                .into(),
                sync_priority: i32::from(listed),
                write_lsn: Some(node.pg.wal.len() as u64),
                flush_lsn: Some(node.pg.wal.len() as u64),
                replay_lsn: Some(node.pg.wal.len() as u64),
            });
        }
        rows
    }
}

fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    rng.random_bool(p.clamp(0.0, 1.0))
}

fn between(rng: &mut ChaCha8Rng, lo: Us, hi: Us) -> Us {
    if hi <= lo {
        lo
    } else {
        rng.random_range(lo..hi)
    }
}

/// `nodes[i]` mutably and `nodes[u]` shared, for `i != u`.
fn pair(nodes: &mut [Node], i: usize, u: usize) -> (&mut Node, &Node) {
    if i < u {
        let (l, r) = nodes.split_at_mut(u);
        (&mut l[i], &r[0])
    } else {
        let (l, r) = nodes.split_at_mut(i);
        (&mut r[0], &l[u])
    }
}

/// Shared handle on the world for the agents.
///
/// A mutex because the agent's ports must be `Send + Sync`; one schedule runs on one thread,
/// so the lock is never contended, and taking it twice is a bug reported where it happens.
#[derive(Clone)]
pub struct Shared(Arc<std::sync::Mutex<World>>);

impl Shared {
    pub fn new(world: World) -> Self {
        Shared(Arc::new(std::sync::Mutex::new(world)))
    }

    #[track_caller]
    pub fn borrow(&self) -> std::sync::MutexGuard<'_, World> {
        match self.0.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => panic!("the world is already borrowed"),
        }
    }

    #[track_caller]
    pub fn borrow_mut(&self) -> std::sync::MutexGuard<'_, World> {
        self.borrow()
    }
}

/// A member's record as the agent publishes it.
pub fn conn_url(i: usize) -> String {
    format!("postgres://10.0.0.{}:5432/postgres", i + 1)
}

pub fn api_url(i: usize) -> String {
    format!("http://10.0.0.{}:8008/patroni", i + 1)
}

/// An `Arc` of the store's view, for an observation.
pub fn view_arc(store: &Store) -> Arc<ClusterView> {
    Arc::new(store.view())
}
