//! The agent's HA loop ([`pgwarden::ha::HaLoop`]) on its own, with in-memory ports and
//! tokio's paused clock: paths the end-to-end suite covers with real processes and sleeps,
//! here in milliseconds.
//!
//! The ports answer at once; the DCS can be made unreachable, postgres can be made to crash
//! after each start, and the fence fires when the paused clock passes its deadline, as the
//! supervisor's timer would.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pgwarden::config::Config;
use pgwarden::dcs::{
    ClusterView, Dcs, DcsError, FailoverRequest, HistoryLine, LeaderKey, LeaderStatus,
    LeaseRenewal, Member, MemberRecord, SyncState, Versioned, Wakeup,
};
use pgwarden::ha::local::SystemRuntime;
use pgwarden::ha::observe::{DataDir, PeerAnswer};
use pgwarden::ha::ports::{LongTask, Peers, Postgres, TaskError};
use pgwarden::ha::HaLoop;
use pgwarden::peer::PeerStatus;
use pgwarden::postgres::conf::ManagedFiles;
use pgwarden::postgres::controldata::{ClusterState, ControlData};
use pgwarden::postgres::replica::Upstream;
use pgwarden::postgres::supervisor::{PidfileStatus, Postmaster, StopMode};
use pgwarden::state::PostgresStatus;
use tokio_util::sync::CancellationToken;

const SYSID: &str = "7300000000000000001";
const TTL: Duration = Duration::from_secs(30);

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn record(i: u8) -> MemberRecord {
    MemberRecord {
        conn_url: format!("postgres://10.0.0.{i}:5432/postgres"),
        api_url: format!("http://10.0.0.{i}:8008/patroni"),
        state: "running".into(),
        role: "replica".into(),
        ..Default::default()
    }
}

/// A cluster of members `a` (the loop under test) and `b`.
fn view(leader: Option<&str>, config: serde_json::Value) -> ClusterView {
    ClusterView {
        initialize: Some(Versioned {
            value: SYSID.into(),
            revision: 1,
        }),
        config: Some(Versioned {
            value: config,
            revision: 1,
        }),
        leader: leader.map(|l| LeaderKey {
            name: l.into(),
            revision: 2,
            lease: 7,
        }),
        members: ["a", "b"]
            .iter()
            .zip([1u8, 2])
            .map(|(n, i)| Member {
                name: (*n).into(),
                record: record(i),
                revision: 3,
                lease: 7,
            })
            .collect(),
        revision: 10,
        ..Default::default()
    }
}

fn dynamic(loop_wait: u64, pause: bool) -> serde_json::Value {
    let mut v = serde_json::json!({
        "ttl": TTL.as_secs(), "loop_wait": loop_wait, "retry_timeout": 10,
        "maximum_lag_on_failover": 1_048_576,
        "postgresql": {"use_pg_rewind": true, "use_slots": false},
    });
    if pause {
        v["pause"] = true.into();
    }
    v
}

/// The store: every write lands in `view`; `reachable: false` fails each request after the
/// request timeout.
struct MemDcs {
    view: Mutex<ClusterView>,
    reachable: Mutex<bool>,
    calls: Mutex<Vec<&'static str>>,
    /// When our lease expires in the store (set by each renewal and acquisition).
    lease_expires: Mutex<Option<Instant>>,
    /// The store becomes unreachable right after answering a successful acquisition.
    cut_after_acquire: Mutex<bool>,
}

impl MemDcs {
    fn new(view: ClusterView) -> Arc<Self> {
        Arc::new(MemDcs {
            view: Mutex::new(view),
            reachable: Mutex::new(true),
            calls: Mutex::new(Vec::new()),
            lease_expires: Mutex::new(None),
            cut_after_acquire: Mutex::new(false),
        })
    }

    async fn call(&self, name: &'static str) -> Result<MutexGuard<'_, ClusterView>, DcsError> {
        if !*lock(&self.reachable) {
            // Refused quickly, as by a host that is up without etcd: the loop keeps cycling
            // while the lease runs out, which is when a fence could be dropped by mistake.
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Err(DcsError::unreachable("timed out"));
        }
        lock(&self.calls).push(name);
        Ok(lock(&self.view))
    }

    fn called(&self, name: &str) -> bool {
        lock(&self.calls).contains(&name)
    }
}

#[async_trait]
impl Dcs for MemDcs {
    async fn cluster(&self) -> Result<ClusterView, DcsError> {
        Ok(self.call("cluster").await?.clone())
    }
    async fn race_initialize(&self, _value: &str) -> Result<bool, DcsError> {
        drop(self.call("race_initialize").await?);
        Ok(false)
    }
    async fn set_initialize(&self, sysid: &str) -> Result<(), DcsError> {
        self.call("set_initialize").await?.initialize = Some(Versioned {
            value: sysid.into(),
            revision: 1,
        });
        Ok(())
    }
    async fn cancel_initialize(&self, _: Option<i64>) -> Result<bool, DcsError> {
        self.call("cancel_initialize").await?.initialize = None;
        Ok(true)
    }
    async fn write_config(&self, _: &serde_json::Value, _: Option<i64>) -> Result<bool, DcsError> {
        drop(self.call("write_config").await?);
        Ok(false)
    }
    async fn acquire_leader(&self) -> Result<bool, DcsError> {
        let mut v = self.call("acquire_leader").await?;
        if v.leader.is_some() {
            return Ok(false);
        }
        v.leader = Some(LeaderKey {
            name: "a".into(),
            revision: 20,
            lease: 7,
        });
        *lock(&self.lease_expires) = Some(now() + TTL);
        if *lock(&self.cut_after_acquire) {
            *lock(&self.reachable) = false;
        }
        Ok(true)
    }
    async fn renew_leader(&self) -> Result<LeaseRenewal, DcsError> {
        let sent_at = now();
        let v = self.call("renew_leader").await?;
        if v.leader_name() != Some("a") {
            return Err(DcsError::rejected("not ours"));
        }
        *lock(&self.lease_expires) = Some(sent_at + TTL);
        Ok(LeaseRenewal { sent_at, ttl: TTL })
    }
    async fn release_leader(&self) -> Result<(), DcsError> {
        let mut v = self.call("release_leader").await?;
        if v.leader_name() == Some("a") {
            v.leader = None;
        }
        Ok(())
    }
    async fn touch_member(&self, _: &MemberRecord) -> Result<(), DcsError> {
        drop(self.call("touch_member").await?);
        Ok(())
    }
    async fn write_status(&self, status: &LeaderStatus) -> Result<(), DcsError> {
        self.call("write_status").await?.status = Some(status.clone());
        Ok(())
    }
    async fn write_history(&self, history: &[HistoryLine]) -> Result<(), DcsError> {
        self.call("write_history").await?.history = history.to_vec();
        Ok(())
    }
    async fn write_failover(
        &self,
        request: &FailoverRequest,
        _: Option<i64>,
    ) -> Result<bool, DcsError> {
        let mut v = self.call("write_failover").await?;
        v.failover = (request.leader.is_some() || request.member.is_some()).then(|| Versioned {
            value: request.clone(),
            revision: 30,
        });
        Ok(true)
    }
    async fn write_sync(&self, sync: Option<&SyncState>, _: Option<i64>) -> Result<bool, DcsError> {
        self.call("write_sync").await?.sync = sync.map(|s| Versioned {
            value: s.clone(),
            revision: 40,
        });
        Ok(true)
    }
    async fn revoke_lease(&self) -> Result<(), DcsError> {
        drop(self.call("revoke_lease").await?);
        Ok(())
    }
    async fn wait_for_change(&self, timeout: Duration) -> Wakeup {
        tokio::time::sleep(timeout).await;
        Wakeup::Timeout
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Run {
    Down,
    Running { since: Instant },
    Crashed,
}

/// Postgres: running as a primary or a standby, stopped by the fence when the clock passes
/// its deadline, crashing `crash_after` each start if set.
struct PgState {
    run: Run,
    standby: bool,
    wal: u64,
    fence: Option<Instant>,
    fenced_at: Option<Instant>,
    crash_after: Option<Duration>,
    starts: Vec<Instant>,
    stops: Vec<StopMode>,
    promotes: u32,
}

struct MemPostgres(Arc<Mutex<PgState>>);

impl MemPostgres {
    fn new(running: bool, standby: bool) -> (Self, Arc<Mutex<PgState>>) {
        let state = Arc::new(Mutex::new(PgState {
            run: if running {
                Run::Running { since: now() }
            } else {
                Run::Down
            },
            standby,
            wal: 0x100_0000,
            fence: None,
            fenced_at: None,
            crash_after: None,
            starts: Vec::new(),
            stops: Vec::new(),
            promotes: 0,
        }));
        (MemPostgres(state.clone()), state)
    }

    /// The state after what the clock alone does: the fence's timer and scheduled crashes.
    fn settled(&self) -> MutexGuard<'_, PgState> {
        let mut s = lock(&self.0);
        let t = now();
        if let (Some(f), Run::Running { .. }) = (s.fence, s.run) {
            if t >= f {
                s.run = Run::Down;
                s.fenced_at = Some(f);
                s.fence = None;
            }
        }
        if let (Some(after), Run::Running { since }) = (s.crash_after, s.run) {
            if t >= since + after {
                s.run = Run::Crashed;
            }
        }
        s
    }
}

/// No long task is started in these tests.
struct NoTask;

impl Future for NoTask {
    type Output = Result<Result<(), TaskError>, String>;
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Err("no long tasks here".into()))
    }
}

impl LongTask for NoTask {
    fn abort(&self) {}
}

#[async_trait]
impl Postgres for MemPostgres {
    type Task = NoTask;

    fn state(&self) -> Postmaster {
        let s = self.settled();
        let since = now();
        match s.run {
            Run::Down => Postmaster::NotRunning,
            Run::Crashed => Postmaster::Crashed {
                at: since,
                exit: "signal 6".into(),
            },
            Run::Running { .. } => Postmaster::Running {
                pid: 2,
                since,
                status: if s.standby {
                    PidfileStatus::Standby
                } else {
                    PidfileStatus::Ready
                },
            },
        }
    }
    async fn start(&self) -> Result<(), String> {
        let mut s = self.settled();
        s.run = Run::Running { since: now() };
        s.starts.push(now());
        Ok(())
    }
    async fn stop(&self, mode: StopMode, _: Duration) -> Result<(), String> {
        let mut s = self.settled();
        s.run = Run::Down;
        s.stops.push(mode);
        Ok(())
    }
    fn set_fence(&self, deadline: Option<Instant>) {
        self.settled().fence = deadline;
    }
    async fn wait_ready(&self, _: Duration) -> bool {
        matches!(self.settled().run, Run::Running { .. })
    }
    async fn status(&self) -> Result<PostgresStatus, String> {
        let s = self.settled();
        if !matches!(s.run, Run::Running { .. }) {
            return Err("no connection".into());
        }
        Ok(PostgresStatus {
            in_recovery: s.standby,
            server_version: 150_000,
            timeline: Some(1),
            postmaster_start_time: None,
            postmaster_start_epoch: None,
            wal_flush_lsn: (!s.standby).then_some(s.wal),
            receive_lsn: s.standby.then_some(s.wal),
            replay_lsn: s.standby.then_some(s.wal),
            replayed_timestamp: None,
            replay_paused: false,
            streaming: s.standby,
            system_identifier: Some(SYSID.into()),
            replication: vec![],
            pending_restart: vec![],
            min_recovery: s.standby.then_some((1, s.wal)),
            synchronous_standby_names: None,
        })
    }
    fn changes(&self) -> u64 {
        0
    }
    async fn reset(&self) {}
    async fn promote(&self) -> Result<(), String> {
        let mut s = self.settled();
        s.promotes += 1;
        s.standby = false;
        Ok(())
    }
    async fn checkpoint(&self) -> Result<(), String> {
        Ok(())
    }
    async fn reload(&self) -> Result<(), String> {
        Ok(())
    }
    async fn replication_slots(
        &self,
    ) -> Result<Vec<pgwarden::postgres::slots::ReplicationSlot>, String> {
        // Slots are not modelled: the simulated WAL is never recycled.
        Ok(Vec::new())
    }

    async fn change_slot(
        &self,
        _: &pgwarden::ha::slots::SlotChange,
    ) -> Result<(), pgwarden::ha::ports::SlotChangeError> {
        Ok(())
    }

    async fn read_primary_slots(
        &self,
        _: &Config,
        _: &Upstream,
        _: &[String],
        _: bool,
    ) -> Result<Vec<pgwarden::postgres::slots::PrimarySlot>, String> {
        Err("slots are not modelled".into())
    }

    async fn install_slots(
        &self,
        _: &[pgwarden::postgres::slots::PrimarySlot],
    ) -> Result<(), String> {
        Err("slots are not modelled".into())
    }

    async fn hot_standby_shortfall(&self) -> Option<(ControlData, Vec<String>)> {
        None
    }
    async fn inspect_data_dir(&self) -> DataDir {
        let s = self.settled();
        DataDir::Initialized {
            control: ControlData {
                system_identifier: SYSID.into(),
                state: if s.standby {
                    ClusterState::ShutDownInRecovery
                } else {
                    ClusterState::ShutDown
                },
                timeline: Some(1),
                checkpoint_lsn: Some(s.wal),
                raw: Default::default(),
            },
            standby_signal: s.standby,
        }
    }
    fn standby_signal(&self) -> bool {
        self.settled().standby
    }
    async fn control_checkpoint(&self) -> Option<u64> {
        Some(self.settled().wal)
    }
    async fn write_conf(&self, files: &ManagedFiles) -> Result<bool, String> {
        self.settled().standby = files.standby.is_some();
        Ok(false)
    }
    async fn remove_data_dir(&self) -> Result<(), String> {
        Err("not in these tests".into())
    }
    async fn timeline_history(&self, _: u32) -> Result<String, String> {
        Ok(String::new())
    }
    fn load_dynamic_copy(&self) -> Option<serde_json::Value> {
        None
    }
    fn save_dynamic_copy(&self, _: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    async fn leader_ready_for_rewind(&self, _: &Config, _: &Upstream) -> Result<(), String> {
        Ok(())
    }
    fn bootstrap(&self, _: Arc<Config>, _: ManagedFiles) -> NoTask {
        NoTask
    }
    fn create_replica(&self, _: Arc<Config>, _: Option<Upstream>, _: ManagedFiles) -> NoTask {
        NoTask
    }
    fn rewind(&self, _: Arc<Config>, _: Upstream, _: bool, _: ManagedFiles) -> NoTask {
        NoTask
    }
}

/// Peers answer with the statuses given; a member without one does not answer.
struct MemPeers(Vec<PeerStatus>);

#[async_trait]
impl Peers for MemPeers {
    async fn ask(&self, members: Vec<(String, String)>, _: Duration) -> Vec<PeerAnswer> {
        members
            .into_iter()
            .map(|(name, _)| PeerAnswer {
                status: self.0.iter().find(|p| p.name == name).cloned(),
                name,
            })
            .collect()
    }
}

fn replica_b(wal_position: u64) -> PeerStatus {
    PeerStatus {
        name: "b".into(),
        is_primary: false,
        wal_position,
        nofailover: false,
        failover_priority: 1,
        watchdog_failed: false,
        state: "running".into(),
        timeline: Some(1),
    }
}

/// Member `a`'s loop over the ports, running on the (paused) runtime until the token is
/// cancelled.
fn start(
    dcs: Arc<MemDcs>,
    pg: MemPostgres,
    peers: MemPeers,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let mut config = Config {
        name: "a".into(),
        scope: "test".into(),
        ..Default::default()
    };
    config.postgresql.connect_address = "10.0.0.1:5432".into();
    config.restapi.connect_address = "10.0.0.1:8008".into();
    config.bootstrap.dcs.ttl = TTL.as_secs() as u32;
    let config = Arc::new(config);
    let (status_tx, _) =
        tokio::sync::watch::channel(Arc::new(pgwarden::ha::initial_status(&config)));
    let ha = HaLoop::new(
        config,
        dcs,
        pg,
        peers,
        SystemRuntime,
        status_tx,
        Arc::new(tokio::sync::Notify::new()),
    );
    let token = CancellationToken::new();
    let stop = token.clone();
    let task = tokio::spawn(async move {
        let _ = ha.run(stop).await;
    });
    (token, task)
}

/// Patroni `ha.py` (`update_lock` failing) and `patroni-compat.md` §5.4: a leader that cannot
/// renew keeps running only while its lease is certain; the fence stops postgres before the
/// lease can expire in the store, so no other member can be promoted while it accepts writes.
#[tokio::test(start_paused = true)]
async fn leader_that_cannot_renew_stops_postgres_before_its_lease_expires() {
    let dcs = MemDcs::new(view(Some("a"), dynamic(10, false)));
    let (pg, state) = MemPostgres::new(true, false);
    let (token, task) = start(dcs.clone(), pg, MemPeers(vec![replica_b(0x100_0000)]));
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert!(dcs.called("renew_leader"), "the leader renews its lease");
    *lock(&dcs.reachable) = false;
    let expires = lock(&dcs.lease_expires).expect("renewed at least once");
    tokio::time::sleep(TTL * 2).await;
    {
        let s = lock(&state);
        let fenced_at = s.fenced_at.expect("the fence stopped postgres");
        assert!(
            fenced_at < expires,
            "postgres was stopped at {:?} after the lease could expire",
            fenced_at - (expires - TTL)
        );
        assert_eq!(s.run, Run::Down);
    }
    token.cancel();
    let _ = task.await;
}

/// A primary that lost its key (failsafe mode kept it running through an etcd outage) races
/// for the free key and wins, but etcd goes away again before the lease is confirmed: the key
/// is ours on a lease nobody renews, so the primary must stop before that lease can expire,
/// when a replica that reaches etcd could take the key. (The failsafe e2e test found such a
/// primary running on, unfenced, for minutes.)
#[tokio::test(start_paused = true)]
async fn a_primary_whose_acquisition_was_never_confirmed_stops_before_the_key_can_expire() {
    let dcs = MemDcs::new(view(None, dynamic(10, false)));
    *lock(&dcs.cut_after_acquire) = true;
    let (pg, state) = MemPostgres::new(true, false);
    let (token, task) = start(dcs.clone(), pg, MemPeers(vec![replica_b(0x100_0000)]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        dcs.called("acquire_leader"),
        "the primary raced for the key"
    );
    let expires = lock(&dcs.lease_expires).expect("the key was acquired");
    tokio::time::sleep_until((expires - Duration::from_millis(100)).into()).await;
    {
        let s = lock(&state);
        assert_eq!(s.run, Run::Down, "the unconfirmed primary still runs");
        assert_eq!(s.stops, vec![StopMode::Immediate]);
    }
    assert!(
        lock(&dcs.view).leader_name() == Some("a"),
        "the test meant the key to stay ours in the store"
    );
    token.cancel();
    let _ = task.await;
}

/// Patroni's maintenance mode (`docs/pause.rst`): with the cluster paused, a replica neither
/// races for a free leader key nor promotes, and a postgres that crashed is left as it is.
#[tokio::test(start_paused = true)]
async fn pause_takes_no_automatic_action() {
    let dcs = MemDcs::new(view(None, dynamic(10, true)));
    let (pg, state) = MemPostgres::new(true, true);
    let (token, task) = start(dcs.clone(), pg, MemPeers(vec![]));
    tokio::time::sleep(Duration::from_secs(60)).await;
    lock(&state).run = Run::Crashed;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(dcs.called("cluster"), "the loop ran");
    assert!(!dcs.called("acquire_leader"), "no race in pause");
    {
        let s = lock(&state);
        assert_eq!(s.promotes, 0, "no promotion in pause");
        assert!(s.starts.is_empty(), "no restart in pause: {:?}", s.starts);
        assert!(s.stops.is_empty(), "no stop in pause: {:?}", s.stops);
    }
    token.cancel();
    let _ = task.await;
}

/// A postgres that keeps crashing right after it starts is restarted at once the first time,
/// then after 1 s, 2 s, 4 s, … (`HaLoop::restart_backoff`), not in a tight loop.
#[tokio::test(start_paused = true)]
async fn restart_backoff_grows_while_postgres_keeps_crashing() {
    let dcs = MemDcs::new(view(Some("b"), dynamic(1, false)));
    let (pg, state) = MemPostgres::new(false, true);
    lock(&state).run = Run::Crashed;
    lock(&state).crash_after = Some(Duration::from_millis(500));
    let (token, task) = start(dcs.clone(), pg, MemPeers(vec![]));
    tokio::time::sleep(Duration::from_secs(40)).await;
    token.cancel();
    let _ = task.await;
    let starts = lock(&state).starts.clone();
    assert!(starts.len() >= 4, "postgres was restarted: {starts:?}");
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    // Before start k + 1 there were k + 1 crashes; from the second on, the wait doubles.
    for (k, gap) in gaps.iter().enumerate() {
        let crashes = k as u32 + 1;
        if crashes >= 2 {
            let backoff = Duration::from_secs(1 << (crashes - 2).min(6));
            assert!(
                *gap >= backoff,
                "start {} came {gap:?} after the previous one, within the {backoff:?} backoff: {gaps:?}",
                k + 1
            );
        }
    }
    // Without the backoff the 1 s loop would have started it about 40 times.
    assert!(
        starts.len() <= 8,
        "{} starts in 40 s: {gaps:?}",
        starts.len()
    );
}

/// Patroni `ha.py` (`manual_failover_process_no_leader`/`is_failover_possible`): a switchover
/// to a candidate that lags more than `maximum_lag_on_failover` is aborted; the leader keeps
/// its key and its postgres, and the request is cleared.
#[tokio::test(start_paused = true)]
async fn switchover_to_a_lagging_candidate_is_aborted() {
    let mut v = view(Some("a"), dynamic(10, false));
    v.failover = Some(Versioned {
        value: FailoverRequest {
            leader: Some("a".into()),
            member: Some("b".into()),
            scheduled_at: None,
        },
        revision: 5,
    });
    let dcs = MemDcs::new(v);
    let (pg, state) = MemPostgres::new(true, false);
    // The leader is at 0x100_0000 + 64 MiB; b has nothing past the start.
    lock(&state).wal = 0x100_0000 + (64 << 20);
    let (token, task) = start(dcs.clone(), pg, MemPeers(vec![replica_b(0x100_0000)]));
    tokio::time::sleep(Duration::from_secs(30)).await;
    let view = lock(&dcs.view).clone();
    assert!(view.failover.is_none(), "the request is cleared");
    assert_eq!(view.leader_name(), Some("a"), "the leader keeps its key");
    {
        let s = lock(&state);
        assert!(s.stops.is_empty(), "postgres was stopped: {:?}", s.stops);
        assert!(matches!(s.run, Run::Running { .. }));
    }
    token.cancel();
    let _ = task.await;
}
