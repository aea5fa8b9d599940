//! One member's agent: the agent's real HA loop ([`pgwarden::ha::HaLoop`]) run with simulated
//! ports, so that every DCS request, peer call and postgres action takes simulated time.
//!
//! Nothing here decides anything: the DCS port ([`SimDcs`]) behaves as the etcd client does
//! (one lease per agent process, keepalives, the watch cache that vouches for `leader`), the
//! postgres port ([`SimPostgres`]) acts on the world's postgres, the peers port answers as
//! the members' REST APIs would, and the runtime port is the member's own drifting clock.
//! Dropping the future is `kill -9`; not polling it is SIGSTOP.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use pgwarden::config::Config;
use pgwarden::dcs::{
    ClusterView, Dcs, DcsError, FailoverRequest, HistoryLine, LeaderStatus, LeaseRenewal,
    MemberRecord, SyncState, Wakeup,
};
use pgwarden::ha::decide::{Decision, Outcome};
use pgwarden::ha::failsafe::{FailsafeAnswer, FailsafeRequest};
use pgwarden::ha::observe::{DataDir, PeerAnswer};
use pgwarden::ha::ports::{LongTask, Peers, Postgres, Runtime, TaskError};
use pgwarden::ha::HaLoop;
use pgwarden::peer::PeerStatus;
use pgwarden::postgres::conf::ManagedFiles;
use pgwarden::postgres::controldata::{ClusterState, ControlData};
use pgwarden::postgres::replica::Upstream;
use pgwarden::postgres::supervisor::{PidfileStatus, Postmaster, StopMode};
use pgwarden::state::PostgresStatus;

use crate::world::{Event, PgRun, Shared, Store, Us, MS, SEC, SYSID};

/// Sleeps until a global instant; `idle` waits also end on a watch event.
///
/// Several sleeps may be pending in one poll of the agent (the loop waits for the DCS and
/// for a long task at once): the agent is woken at the earliest.
pub struct Sleep {
    world: Shared,
    node: usize,
    until: Us,
    idle: bool,
}

impl Future for Sleep {
    type Output = bool;
    /// Ready with `true` when a watch event ended an idle wait.
    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<bool> {
        let mut w = self.world.borrow_mut();
        let now = w.now;
        let n = &mut w.nodes[self.node];
        if now >= self.until || (self.idle && n.woken) {
            let woken = self.idle && n.woken && now < self.until;
            n.woken = false;
            n.idle = false;
            Poll::Ready(woken)
        } else {
            n.wake_at = n.wake_at.min(self.until);
            n.idle |= self.idle;
            Poll::Pending
        }
    }
}

fn sleep_global(world: &Shared, node: usize, until: Us, idle: bool) -> Sleep {
    Sleep {
        world: world.clone(),
        node,
        until,
        idle,
    }
}

/// Sleeps `local` microseconds of the member's own clock (for its other processes: the fence
/// guard's release command).
pub fn sleep_for(world: &Shared, node: usize, local: Us) -> Sleep {
    sleep_local(world, node, local)
}

/// Sleeps a duration of the member's own clock.
fn sleep_local(world: &Shared, node: usize, local: Us) -> Sleep {
    let until = {
        let w = world.borrow();
        w.now + w.nodes[node].clock.global_len(local).max(1)
    };
    sleep_global(world, node, until, false)
}

fn local_now(world: &Shared, node: usize) -> Us {
    let w = world.borrow();
    w.nodes[node].local_now(w.now)
}

fn log(world: &Shared, node: usize, line: impl FnOnce() -> String) {
    let mut w = world.borrow_mut();
    let name = w.nodes[node].name.clone();
    w.log(|| format!("{name}: {}", line()));
}

/// The member's configuration file, as the agent would load it.
pub fn config(w: &Shared, me: usize) -> Config {
    let w = w.borrow();
    let n = &w.nodes[me];
    let mut config = Config {
        name: n.name.clone(),
        scope: "sim".into(),
        ..Default::default()
    };
    config.postgresql.connect_address = format!("10.0.0.{}:5432", me + 1);
    config.restapi.connect_address = format!("10.0.0.{}:8008", me + 1);
    config.tags.nofailover = n.tags.nofailover;
    config.tags.failover_priority =
        (n.tags.failover_priority != 1).then_some(n.tags.failover_priority);
    let dcs = &mut config.bootstrap.dcs;
    dcs.ttl = w.initial.ttl as u32;
    dcs.loop_wait = w.initial.loop_wait as u32;
    dcs.retry_timeout = w.initial.retry_timeout as u32;
    dcs.maximum_lag_on_failover = w.initial.maximum_lag_on_failover;
    dcs.synchronous_mode = match (w.initial.synchronous_mode, w.initial.quorum) {
        (false, _) => pgwarden::config::SynchronousMode::Off,
        (true, false) => pgwarden::config::SynchronousMode::On,
        (true, true) => pgwarden::config::SynchronousMode::Quorum,
    };
    dcs.synchronous_node_count = w.initial.synchronous_node_count;
    dcs.synchronous_mode_strict = w.initial.strict;
    dcs.failsafe_mode = w.initial.failsafe_mode;
    dcs.postgresql.use_pg_rewind = true;
    dcs.postgresql.use_slots = true;
    config
}

/// The agent process: the real HA loop over this member's simulated ports, until it is
/// killed (the future dropped) or stops with a fatal error.
pub async fn run(w: Shared, me: usize) {
    let config = Arc::new(config(&w, me));
    // The loop derives the timing from the DCS `config` and sends it here, as to etcd's client.
    let (timing_tx, timing) =
        tokio::sync::watch::channel(pgwarden::config::Timing::bootstrap(&config));
    let dcs = Arc::new(SimDcs {
        w: w.clone(),
        me,
        name: config.name.clone(),
        timing,
        state: Mutex::new(DcsState::default()),
    });
    let pg = SimPostgres {
        w: w.clone(),
        me,
        changes: AtomicU64::new(0),
    };
    let status = pgwarden::ha::initial_status(&config);
    let (status_tx, _status_rx) = tokio::sync::watch::channel(Arc::new(status));
    // Nothing notifies: a postgres that changes state wakes the agent through the world.
    let notify = Arc::new(tokio::sync::Notify::new());
    let (peers, rt) = (
        SimPeers { w: w.clone(), me },
        SimRuntime { w: w.clone(), me },
    );
    // A new process: its REST API's failsafe state starts empty.
    let failsafe = Arc::new(pgwarden::ha::failsafe::Failsafe::new());
    w.borrow_mut().nodes[me].failsafe = failsafe.clone();
    let ha = HaLoop::new(config, dcs, pg, peers, rt, status_tx, notify)
        .with_timing(timing_tx)
        .with_failsafe(failsafe);
    let never = tokio_util::sync::CancellationToken::new();
    if let Err(e) = ha.run(never).await {
        let mut w = w.borrow_mut();
        w.events.push(Event::Fatal {
            node: me,
            reason: e.to_string(),
        });
        w.nodes[me].alive = false;
    }
}

/// What the etcd client of one agent process keeps.
#[derive(Default)]
struct DcsState {
    lease: Option<i64>,
    last_keepalive: Option<Us>,
    last_member: Option<(MemberRecord, i64)>,
    /// `leader` (holder, lease, revision) in the last view, until a renewal has used it: the
    /// watch cache that vouches for the view confirms the renewal without a compare.
    view_leader: Option<(String, i64, i64)>,
}

/// The DCS as one agent's etcd client sees it.
pub struct SimDcs {
    w: Shared,
    me: usize,
    name: String,
    /// ttl for future leases and the request timeout (retry_timeout), as the loop sends them.
    timing: tokio::sync::watch::Receiver<pgwarden::config::Timing>,
    state: Mutex<DcsState>,
}

impl SimDcs {
    fn st(&self) -> std::sync::MutexGuard<'_, DcsState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One request: it takes a random latency, is applied halfway through if the store is
    /// reachable, and times out after `retry_timeout` (then it may or may not have been
    /// applied, as the trait says).
    async fn request<R: Send>(
        &self,
        op: impl FnOnce(&mut Store, Us) -> R + Send,
    ) -> Result<R, DcsError> {
        let timeout = self.timing.borrow().retry_timeout.as_micros() as Us;
        let latency = {
            let mut w = self.w.borrow_mut();
            let slow = !w.quiet && w.chance(0.02);
            if slow {
                w.between(timeout / 2, timeout * 3 / 2)
            } else {
                w.between(MS, 20 * MS)
            }
        };
        let half = latency.min(timeout) / 2;
        sleep_local(&self.w, self.me, half).await;
        let applied = {
            let mut w = self.w.borrow_mut();
            let reach = w.reaches_dcs(self.me) && (latency <= timeout || w.chance(0.5));
            if reach {
                let now = w.now;
                w.store.expire(now);
                Some(op(&mut w.store, now))
            } else {
                None
            }
        };
        let unreachable = || DcsError::unreachable("request timed out");
        if latency > timeout || applied.is_none() {
            sleep_local(&self.w, self.me, timeout - half).await;
            return Err(unreachable());
        }
        sleep_local(&self.w, self.me, latency - half).await;
        if !self.w.borrow().reaches_dcs(self.me) {
            return Err(unreachable());
        }
        applied.ok_or_else(unreachable)
    }

    async fn ensure_lease(&self) -> Result<i64, DcsError> {
        if let Some(id) = self.st().lease {
            return Ok(id);
        }
        let (me, ttl) = (self.me, self.timing.borrow().ttl.as_micros() as Us);
        let id = self.request(move |s, now| s.grant(me, ttl, now)).await?;
        self.st().lease = Some(id);
        Ok(id)
    }

    /// A client of its own, without a lease: the fence guard's release command.
    pub fn client(w: &Shared, me: usize, config: &Config) -> SimDcs {
        let timing = tokio::sync::watch::channel(pgwarden::config::Timing::bootstrap(config)).1;
        SimDcs {
            w: w.clone(),
            me,
            name: config.name.clone(),
            timing,
            state: Mutex::new(DcsState::default()),
        }
    }

    /// The fence guard's release token, as `EtcdDcs::leader_on_lease` keeps it: set after every
    /// acquire or renewal that showed `leader` ours (the lease it hangs on and its revision),
    /// cleared when it is not, or is being released.
    fn leader_on_lease(&self, token: Option<(i64, i64)>) {
        let token = token.map(|(lease, revision)| crate::guard::Token { lease, revision });
        self.w.borrow_mut().nodes[self.me].guard_token = token;
    }

    fn lease_gone(&self) {
        let mut st = self.st();
        st.lease = None;
        st.last_member = None;
    }
}

#[async_trait]
impl Dcs for SimDcs {
    async fn cluster(&self) -> Result<ClusterView, DcsError> {
        self.request(|s, _| s.view()).await
    }

    async fn cluster_view(&self) -> Result<Arc<ClusterView>, DcsError> {
        self.st().view_leader = None;
        let view = self.request(|s, _| crate::world::view_arc(s)).await?;
        self.st().view_leader = view
            .leader
            .as_ref()
            .map(|l| (l.name.clone(), l.lease, l.revision));
        Ok(view)
    }

    async fn race_initialize(&self, value: &str) -> Result<bool, DcsError> {
        let v = value.to_owned();
        self.request(move |s, _| {
            if s.initialize.is_some() {
                return false;
            }
            s.set_initialize(v);
            true
        })
        .await
    }

    async fn set_initialize(&self, sysid: &str) -> Result<(), DcsError> {
        let v = sysid.to_owned();
        self.request(move |s, _| s.set_initialize(v)).await
    }

    async fn cancel_initialize(&self, expected_revision: Option<i64>) -> Result<bool, DcsError> {
        self.request(move |s, _| {
            let current = s.initialize.as_ref().map(|i| i.revision);
            if current.is_none() || expected_revision.is_some_and(|e| Some(e) != current) {
                return false;
            }
            s.initialize = None;
            s.bump();
            true
        })
        .await
    }

    async fn write_config(
        &self,
        config: &serde_json::Value,
        expected_revision: Option<i64>,
    ) -> Result<bool, DcsError> {
        let value = config.clone();
        self.request(move |s, _| {
            let current = s.config.as_ref().map(|c| c.revision).unwrap_or(0);
            if expected_revision.is_some_and(|e| e != current) {
                return false;
            }
            s.put_config(value);
            true
        })
        .await
    }

    async fn acquire_leader(&self) -> Result<bool, DcsError> {
        let lease = self.ensure_lease().await?;
        let name = self.name.clone();
        let acquired = self
            .request(move |s, _| {
                if s.leader.is_some() || !s.leases.contains_key(&lease) {
                    return None;
                }
                s.put_leader(&name, lease);
                Some(s.rev)
            })
            .await?;
        if let Some(revision) = acquired {
            self.leader_on_lease(Some((lease, revision)));
        }
        Ok(acquired.is_some())
    }

    /// `EtcdDcs::renew_leader`: keepalive, then, unless the view of this cycle already showed
    /// the key with our name on our lease, confirm (or re-attach) the key in one compare.
    async fn renew_leader(&self) -> Result<LeaseRenewal, DcsError> {
        let lease = self.ensure_lease().await?;
        let sent_local = local_now(&self.w, self.me);
        let sent_at = self.w.borrow().instant(sent_local);
        let ttl = match self.request(move |s, now| s.keepalive(lease, now)).await? {
            Some(ttl) => ttl,
            None => {
                self.lease_gone();
                self.leader_on_lease(None);
                return Err(DcsError::LeaseLost);
            }
        };
        let vouched = {
            let mut st = self.st();
            st.last_keepalive = Some(sent_local);
            st.view_leader
                .take()
                .filter(|(holder, held_on, _)| *holder == self.name && *held_on == lease)
        };
        let renewal = LeaseRenewal {
            sent_at,
            ttl: Duration::from_micros(ttl),
        };
        if let Some((_, _, revision)) = vouched {
            self.leader_on_lease(Some((lease, revision)));
            return Ok(renewal);
        }
        let name = self.name.clone();
        let confirmed = self
            .request(move |s, _| {
                let ours = s.leader.as_ref().is_some_and(|l| l.name == name);
                let same_lease = s.leader.as_ref().is_some_and(|l| l.lease == lease);
                if ours && !same_lease {
                    s.put_leader(&name, lease);
                }
                s.leader.as_ref().filter(|_| ours).map(|l| l.revision)
            })
            .await?;
        match confirmed {
            Some(revision) => {
                self.leader_on_lease(Some((lease, revision)));
                Ok(renewal)
            }
            None => {
                self.leader_on_lease(None);
                Err(DcsError::rejected("the leader key is not ours"))
            }
        }
    }

    async fn release_leader(&self) -> Result<(), DcsError> {
        self.leader_on_lease(None);
        let name = self.name.clone();
        self.request(move |s, _| {
            if s.leader.as_ref().is_some_and(|l| l.name == name) {
                s.leader = None;
                s.changed = true;
                s.rev += 1;
            }
        })
        .await
    }

    /// `EtcdDcs::touch_member`: keepalive unless this cycle's view shows `leader` on our lease
    /// (the HA loop's renewals keep it) or one was sent within a second, then the record unless
    /// unchanged.
    async fn touch_member(&self, record: &MemberRecord) -> Result<(), DcsError> {
        let mut lease = self.ensure_lease().await?;
        let holds_leader = self
            .st()
            .view_leader
            .as_ref()
            .is_some_and(|(holder, held_on, _)| *holder == self.name && *held_on == lease);
        let fresh = holds_leader
            || self
                .st()
                .last_keepalive
                .is_some_and(|at| local_now(&self.w, self.me).saturating_sub(at) < SEC);
        if !fresh {
            let sent = local_now(&self.w, self.me);
            match self.request(move |s, now| s.keepalive(lease, now)).await? {
                Some(_) => self.st().last_keepalive = Some(sent),
                None => {
                    self.lease_gone();
                    lease = self.ensure_lease().await?;
                }
            }
        }
        if self.st().last_member.as_ref() == Some(&(record.clone(), lease)) {
            return Ok(());
        }
        let name = self.name.clone();
        let r = record.clone();
        self.request(move |s, _| {
            if s.leases.contains_key(&lease) {
                s.put_member(&name, r, lease);
            }
        })
        .await?;
        self.st().last_member = Some((record.clone(), lease));
        Ok(())
    }

    async fn member_key_lost(&self) {
        self.st().last_member = None;
    }

    async fn write_status(&self, status: &LeaderStatus) -> Result<(), DcsError> {
        let status = status.clone();
        self.request(move |s, _| s.put_status(status)).await
    }

    async fn write_history(&self, history: &[HistoryLine]) -> Result<(), DcsError> {
        let history = history.to_vec();
        self.request(move |s, _| s.put_history(history)).await
    }

    async fn write_key(&self, key: &str, value: &str) -> Result<(), DcsError> {
        if key != pgwarden::dcs::FAILSAFE_KEY {
            return Err(DcsError::rejected(format!("the simulation has no `{key}`")));
        }
        let topology: std::collections::BTreeMap<String, String> = serde_json::from_str(value)
            .map_err(|e| DcsError::rejected(format!("not a failsafe topology: {e}")))?;
        self.request(move |s, _| s.put_failsafe(topology)).await
    }

    async fn write_failover(
        &self,
        request: &FailoverRequest,
        expected_revision: Option<i64>,
    ) -> Result<bool, DcsError> {
        let request = request.clone();
        self.request(move |s, _| s.put_failover(request, expected_revision))
            .await
    }

    async fn write_sync(
        &self,
        sync: Option<&SyncState>,
        expected_revision: Option<i64>,
    ) -> Result<bool, DcsError> {
        let sync = sync.cloned();
        self.request(move |s, _| s.put_sync(sync, expected_revision))
            .await
    }

    async fn revoke_lease(&self) -> Result<(), DcsError> {
        let lease = self.st().lease.take();
        if let Some(id) = lease {
            self.leader_on_lease(None);
            self.request(move |s, _| s.revoke(id)).await?;
        }
        Ok(())
    }

    /// `EtcdDcs::release_dead_leader`: delete `leader` if it still names us on the token's
    /// lease, then revoke the lease (an expired one is no error); on Kubernetes the record is
    /// cleared if that agent wrote it, and member records have no lease.
    async fn release_dead_leader(&self, token: &str) -> Result<bool, DcsError> {
        let token = crate::guard::Token::decode(token)
            .ok_or_else(|| DcsError::rejected(format!("not a release token: {token:?}")))?;
        let style = self.w.borrow().release_style;
        let name = self.name.clone();
        let released = self
            .request(move |s, _| s.release_dead_leader(&name, token))
            .await?;
        if style == crate::guard::Style::Etcd {
            // A failure is only logged by the real client.
            let _ = self.request(move |s, _| s.revoke(token.lease)).await;
        }
        Ok(released)
    }

    async fn wait_for_change(&self, timeout: Duration) -> Wakeup {
        let until = {
            let w = self.w.borrow();
            w.now + w.nodes[self.me].clock.global_len(timeout.as_micros() as Us)
        };
        if sleep_global(&self.w, self.me, until, true).await {
            Wakeup::ClusterChanged
        } else {
            Wakeup::Timeout
        }
    }
}

/// The member's postgres and data directory, in the world.
pub struct SimPostgres {
    w: Shared,
    me: usize,
    changes: AtomicU64,
}

impl SimPostgres {
    fn sql(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    fn status_now(&self) -> Option<PostgresStatus> {
        let w = self.w.borrow();
        let pg = &w.nodes[self.me].pg;
        if pg.run != PgRun::Running {
            return None;
        }
        let pos = pg.position();
        Some(PostgresStatus {
            in_recovery: pg.in_recovery,
            server_version: 150_000,
            timeline: Some(pg.timeline),
            postmaster_start_time: None,
            postmaster_start_epoch: None,
            wal_flush_lsn: (!pg.in_recovery).then_some(pos),
            receive_lsn: pg.in_recovery.then_some(pos),
            replay_lsn: pg.in_recovery.then_some(pos),
            replayed_timestamp: None,
            replay_paused: false,
            streaming: pg.streaming_from.is_some(),
            system_identifier: Some(SYSID.into()),
            replication: if pg.in_recovery {
                vec![]
            } else {
                w.replication_rows(self.me)
            },
            pending_restart: vec![],
            min_recovery: pg.in_recovery.then_some((pg.timeline, pos)),
            synchronous_standby_names: Some(pg.sync_names.clone()),
        })
    }

    /// The member is about to make postgres writable: the checker looks at the moment.
    fn opens_for_writes(&self) {
        let mut w = self.w.borrow_mut();
        let (automatic, outcome) = w.nodes[self.me].last_decision.clone();
        w.events.push(Event::OpensForWrites {
            node: self.me,
            automatic,
            outcome,
        });
    }

    fn task(&self, kind: SimTaskKind, lo: Us, hi: Us) -> SimTask {
        let mut w = self.w.borrow_mut();
        let d = w.between(lo, hi);
        let snapshot = match &kind {
            SimTaskKind::Rewind { source, .. } => Some(w.nodes[*source].pg.clone()),
            _ => None,
        };
        SimTask {
            w: self.w.clone(),
            me: self.me,
            kind,
            done_at: w.now + d,
            snapshot,
            aborted: AtomicBool::new(false),
        }
    }
}

/// The member a `primary_conninfo` or an upstream's host points at (`10.0.0.<i + 1>`).
fn node_of_host(host: &str) -> Option<usize> {
    host.trim_matches('\'')
        .strip_prefix("10.0.0.")?
        .parse::<usize>()
        .ok()?
        .checked_sub(1)
}

fn upstream_of(files: &ManagedFiles) -> Option<usize> {
    let conninfo = files.standby.as_ref()?.primary_conninfo.as_deref()?;
    conninfo
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("host="))
        .and_then(node_of_host)
}

#[async_trait]
impl Postgres for SimPostgres {
    type Task = SimTask;

    fn state(&self) -> Postmaster {
        let w = self.w.borrow();
        let since = w.base;
        match w.nodes[self.me].pg.run {
            PgRun::Down => Postmaster::NotRunning,
            PgRun::Crashed => Postmaster::Crashed {
                at: since,
                exit: "signal 9".into(),
            },
            PgRun::Starting { .. } => Postmaster::Running {
                pid: 1,
                since,
                status: PidfileStatus::Starting,
            },
            PgRun::Running => Postmaster::Running {
                pid: 1,
                since,
                status: if w.nodes[self.me].pg.in_recovery {
                    PidfileStatus::Standby
                } else {
                    PidfileStatus::Ready
                },
            },
        }
    }

    async fn start(&self) -> Result<(), String> {
        if self.w.borrow().nodes[self.me].pg.is_up() {
            return Err("postgres is already running".into());
        }
        if !self.w.borrow().nodes[self.me].pg.standby_signal {
            self.opens_for_writes();
        }
        let mut w = self.w.borrow_mut();
        let delay = w.between(300 * MS, 2 * SEC);
        let ready_at = w.now + delay;
        w.nodes[self.me].pg.run = PgRun::Starting { ready_at };
        w.nodes[self.me].pg.started_at = w.now;
        Ok(())
    }

    async fn stop(&self, mode: StopMode, _timeout: Duration) -> Result<(), String> {
        let latency = match mode {
            StopMode::Immediate => 10 * MS,
            _ => self.w.borrow_mut().between(100 * MS, SEC),
        };
        sleep_local(&self.w, self.me, latency).await;
        let me = self.me;
        let mut w = self.w.borrow_mut();
        let clean = !matches!(mode, StopMode::Immediate);
        if clean && w.nodes[me].pg.writable() {
            w.flush_to_standbys(me);
        }
        w.nodes[me].pg.stop(clean);
        let name = w.nodes[me].name.clone();
        w.log(|| format!("{name}: postgres stopped ({mode:?})"));
        Ok(())
    }

    fn set_fence(&self, deadline: Option<Instant>) {
        let mut w = self.w.borrow_mut();
        let local = deadline.map(|d| w.local_of_instant(d));
        w.nodes[self.me].fence = local;
    }

    async fn wait_ready(&self, _timeout: Duration) -> bool {
        self.w.borrow().nodes[self.me].pg.run == PgRun::Running
    }

    async fn status(&self) -> Result<PostgresStatus, String> {
        self.status_now()
            .ok_or_else(|| "postgres does not accept connections".into())
    }

    fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    async fn reset(&self) {
        self.sql();
    }

    async fn promote(&self) -> Result<(), String> {
        self.sql();
        let me = self.me;
        {
            let w = self.w.borrow();
            if w.nodes[me].pg.run != PgRun::Running || !w.nodes[me].pg.in_recovery {
                return Err("pg_promote failed".into());
            }
        }
        self.opens_for_writes();
        let mut w = self.w.borrow_mut();
        let d = w.between(100 * MS, SEC);
        w.nodes[me].pg.promote_at = Some(w.now + d);
        Ok(())
    }

    async fn checkpoint(&self) -> Result<(), String> {
        self.sql();
        sleep_local(&self.w, self.me, 50 * MS).await;
        if self.w.borrow().nodes[self.me].pg.run != PgRun::Running {
            return Err("no connection".into());
        }
        Ok(())
    }

    async fn reload(&self) -> Result<(), String> {
        self.sql();
        if self.w.borrow().nodes[self.me].pg.run != PgRun::Running {
            return Err("no connection".into());
        }
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
        // The simulated postgres has no hot-standby parameters to outgrow.
        None
    }

    async fn inspect_data_dir(&self) -> DataDir {
        let w = self.w.borrow();
        let pg = &w.nodes[self.me].pg;
        if !pg.initialized {
            return DataDir::Empty;
        }
        DataDir::Initialized {
            control: ControlData {
                system_identifier: SYSID.into(),
                state: pg.control.clone(),
                timeline: Some(pg.timeline),
                checkpoint_lsn: Some(pg.position()),
                raw: Default::default(),
            },
            standby_signal: pg.standby_signal,
        }
    }

    fn standby_signal(&self) -> bool {
        self.w.borrow().nodes[self.me].pg.standby_signal
    }

    async fn control_checkpoint(&self) -> Option<u64> {
        let w = self.w.borrow();
        let pg = &w.nodes[self.me].pg;
        pg.initialized.then(|| pg.position())
    }

    /// The settings the world models take effect as they are written (a reload follows).
    async fn write_conf(&self, files: &ManagedFiles) -> Result<bool, String> {
        let standby = files.standby.is_some();
        let upstream = upstream_of(files);
        let names = files
            .parameters
            .get("synchronous_standby_names")
            .cloned()
            .unwrap_or_default();
        let mut w = self.w.borrow_mut();
        let pg = &mut w.nodes[self.me].pg;
        let changed =
            pg.standby_signal != standby || pg.upstream != upstream || pg.sync_names != names;
        pg.standby_signal = standby;
        pg.upstream = upstream;
        pg.sync_names = names;
        Ok(changed)
    }

    async fn remove_data_dir(&self) -> Result<(), String> {
        let mut w = self.w.borrow_mut();
        let pg = &mut w.nodes[self.me].pg;
        pg.stop(false);
        *pg = crate::world::Pg::empty();
        Ok(())
    }

    async fn timeline_history(&self, _timeline: u32) -> Result<String, String> {
        let w = self.w.borrow();
        Ok(w.nodes[self.me]
            .pg
            .tl_history
            .iter()
            .map(|(tl, lsn)| {
                format!(
                    "{tl}\t{:X}/{:X}\tno recovery target specified\n",
                    lsn >> 32,
                    lsn & 0xffff_ffff
                )
            })
            .collect())
    }

    fn load_dynamic_copy(&self) -> Option<serde_json::Value> {
        None
    }

    fn save_dynamic_copy(&self, _value: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }

    /// The leader answers a query and runs as a primary; an unreachable one costs the
    /// connection timeout.
    async fn leader_ready_for_rewind(
        &self,
        _config: &Config,
        upstream: &Upstream,
    ) -> Result<(), String> {
        let ready = {
            let w = self.w.borrow();
            node_of_host(&upstream.host)
                .is_some_and(|src| w.linked(self.me, src) && w.nodes[src].pg.writable())
        };
        if ready {
            return Ok(());
        }
        sleep_local(&self.w, self.me, 2 * SEC).await;
        Err("not reachable".into())
    }

    fn bootstrap(&self, _config: Arc<Config>, files: ManagedFiles) -> SimTask {
        let names = files
            .parameters
            .get("synchronous_standby_names")
            .cloned()
            .unwrap_or_default();
        self.task(SimTaskKind::Bootstrap { sync_names: names }, SEC, 3 * SEC)
    }

    fn create_replica(
        &self,
        _config: Arc<Config>,
        upstream: Option<Upstream>,
        _files: ManagedFiles,
    ) -> SimTask {
        // The simulated members have no replica method that works without a leader.
        let source = upstream
            .and_then(|u| node_of_host(&u.host))
            .unwrap_or(usize::MAX);
        self.task(SimTaskKind::Clone { source }, SEC, 4 * SEC)
    }

    fn rewind(
        &self,
        _config: Arc<Config>,
        upstream: Upstream,
        _crashed: bool,
        _files: ManagedFiles,
    ) -> SimTask {
        let source = node_of_host(&upstream.host).unwrap_or(usize::MAX);
        self.task(SimTaskKind::Rewind { source }, 500 * MS, 3 * SEC)
    }
}

#[derive(Debug, Clone)]
enum SimTaskKind {
    Bootstrap { sync_names: String },
    Clone { source: usize },
    Rewind { source: usize },
}

/// A long task: it ends at `done_at`, and its effect on the data directory happens then.
pub struct SimTask {
    w: Shared,
    me: usize,
    kind: SimTaskKind,
    done_at: Us,
    /// What pg_rewind fetched from the source when it started (it connects once, at start).
    snapshot: Option<crate::world::Pg>,
    aborted: AtomicBool,
}

impl SimTask {
    fn finish(&self) -> Result<(), String> {
        let me = self.me;
        let mut w = self.w.borrow_mut();
        let source = match &self.kind {
            SimTaskKind::Bootstrap { sync_names } => {
                let (ready, now) = (w.now + 200 * MS, w.now);
                let pg = &mut w.nodes[me].pg;
                pg.started_at = now;
                pg.initialized = true;
                pg.wal = vec![0];
                pg.timeline = 1;
                pg.standby_signal = false;
                pg.sync_names = sync_names.clone();
                pg.run = PgRun::Starting { ready_at: ready };
                return Ok(());
            }
            SimTaskKind::Clone { source } | SimTaskKind::Rewind { source } => *source,
        };
        if source >= w.nodes.len() {
            return Err("no source".into());
        }
        let reachable = w.nodes[source].pg.run == PgRun::Running && w.linked(me, source);
        if !reachable && self.snapshot.is_none() {
            return Err(format!(
                "could not connect to {}",
                w.nodes[source].name.clone()
            ));
        }
        let src = self
            .snapshot
            .clone()
            .unwrap_or_else(|| w.nodes[source].pg.clone());
        let rewind = matches!(self.kind, SimTaskKind::Rewind { .. });
        let pg = &mut w.nodes[me].pg;
        // pg_rewind against a source whose WAL this data directory already contains (same
        // history, source behind): "no rewind required", our WAL stays.
        let contained = pg.initialized
            && src.wal.len() <= pg.wal.len()
            && pg.wal[..src.wal.len()] == src.wal[..];
        if !(rewind && contained) {
            pg.initialized = true;
            pg.wal = src.wal;
            pg.timeline = src.timeline;
            pg.tl_history = src.tl_history;
        }
        pg.standby_signal = true;
        pg.control = ClusterState::ShutDownInRecovery;
        pg.upstream = Some(source);
        Ok(())
    }
}

impl Future for SimTask {
    type Output = Result<Result<(), TaskError>, String>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.aborted.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        let mut sleep = sleep_global(&self.w, self.me, self.done_at, false);
        match Pin::new(&mut sleep).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => {
                let result = self.finish();
                if let Err(e) = &result {
                    log(&self.w, self.me, || format!("task failed: {e}"));
                }
                Poll::Ready(Ok(result.map_err(TaskError::Failed)))
            }
        }
    }
}

impl LongTask for SimTask {
    fn abort(&self) {
        self.aborted.store(true, Ordering::Relaxed);
    }
}

/// The other members' REST APIs.
pub struct SimPeers {
    w: Shared,
    me: usize,
}

impl SimPeers {
    /// The REST APIs as seen from member `me`'s host.
    pub fn new(w: &Shared, me: usize) -> SimPeers {
        SimPeers { w: w.clone(), me }
    }
}

#[async_trait]
impl Peers for SimPeers {
    async fn ask(&self, members: Vec<(String, String)>, timeout: Duration) -> Vec<PeerAnswer> {
        let mut answers = Vec::new();
        let mut slowest = 5 * MS;
        {
            let w = self.w.borrow();
            for (name, _) in members {
                let Some(p) = w.node_index(&name) else {
                    continue;
                };
                let n = &w.nodes[p];
                // The REST API runs beside the HA loop, so a frozen process does not answer.
                let answers_api = n.alive && w.linked(self.me, p) && w.now >= n.frozen_until;
                let status = answers_api.then(|| PeerStatus {
                    name: name.clone(),
                    is_primary: n.pg.writable(),
                    wal_position: if n.pg.initialized { n.pg.position() } else { 0 },
                    nofailover: n.tags.nofailover || n.tags.failover_priority == 0,
                    failover_priority: n.tags.failover_priority,
                    watchdog_failed: false,
                    state: if n.pg.run == PgRun::Running {
                        "running".into()
                    } else {
                        "stopped".into()
                    },
                    timeline: (n.pg.run == PgRun::Running).then_some(n.pg.timeline),
                });
                if status.is_none() {
                    slowest = timeout.as_micros() as Us;
                }
                answers.push(PeerAnswer { name, status });
            }
        }
        sleep_local(&self.w, self.me, slowest).await;
        answers
    }

    async fn post_failsafe(
        &self,
        members: Vec<(String, String)>,
        request: &FailsafeRequest,
        timeout: Duration,
    ) -> Vec<FailsafeAnswer> {
        // The POSTs go out in parallel: each lands after the request half of its round trip,
        // by then the target may have changed; the round lasts as long as the slowest answer.
        sleep_local(&self.w, self.me, 3 * MS).await;
        let mut slowest = 5 * MS;
        let mut answers = Vec::new();
        for (name, _) in members {
            let target = self.w.borrow().node_index(&name);
            let answer = match target {
                Some(t) => self.failsafe_answer(t, request),
                None => Err("not a member".into()),
            };
            if answer.as_ref().is_err_and(|e| e == "timed out") {
                slowest = timeout.as_micros() as Us;
            }
            answers.push(FailsafeAnswer::from_result(name, answer));
        }
        sleep_local(&self.w, self.me, slowest).await;
        answers
    }
}

impl SimPeers {
    /// `POST /failsafe` as the REST API answers it (`api::accept_failsafe`): a running,
    /// reachable agent in failsafe mode whose postgres is not a primary takes the sender for
    /// the live leader, by its own clock.
    fn failsafe_answer(&self, target: usize, request: &FailsafeRequest) -> Result<(), String> {
        let w = self.w.borrow();
        let n = &w.nodes[target];
        if !(n.alive && w.linked(self.me, target) && w.now >= n.frozen_until) {
            return Err("timed out".into());
        }
        if !n.failsafe.enabled() {
            return Err("502 failsafe_mode is not enabled".into());
        }
        if n.pg.writable() {
            return Err("500 Running as a leader".into());
        }
        let at = w.instant(n.local_now(w.now));
        let ttl = request.ttl.map(Duration::from_secs);
        n.failsafe.leader_alive(&request.name, at, ttl);
        Ok(())
    }
}

/// The member's own clock.
pub struct SimRuntime {
    w: Shared,
    me: usize,
}

#[async_trait]
impl Runtime for SimRuntime {
    fn now(&self) -> Instant {
        let local = local_now(&self.w, self.me);
        self.w.borrow().instant(local)
    }

    fn wall_now(&self) -> chrono::DateTime<chrono::Utc> {
        let local = local_now(&self.w, self.me);
        self.w.borrow().wall(local)
    }

    fn system_now(&self) -> SystemTime {
        SystemTime::from(self.wall_now())
    }

    async fn sleep(&self, duration: Duration) {
        sleep_local(&self.w, self.me, duration.as_micros() as Us).await;
    }

    fn decided(&self, decision: &Decision) {
        let automatic = !matches!(decision.outcome, Outcome::TakingOverAsCandidate);
        let outcome = decision.outcome.to_string();
        let actions = &decision.actions;
        log(&self.w, self.me, || format!("{outcome} {actions:?}"));
        self.w.borrow_mut().nodes[self.me].last_decision = (automatic, outcome);
    }
}
