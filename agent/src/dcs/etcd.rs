//! The DCS over etcd v3 (gRPC, crate `etcd-client`), in Patroni's key layout.
//!
//! One lease per agent process, attached to both `members/<name>` and `leader`, so both vanish
//! together `ttl` after the last keepalive (`patroni-compat.md` §1.4). Every request is bounded by
//! `request_timeout` (the cluster's `retry_timeout`): a hung etcd can never hold the HA loop for
//! longer than that, which is what the fencing arithmetic in `ha::timing` relies on.
//!
//! A background task reads the cluster prefix once, then watches it from just after that read.
//! It keeps the HA loop's view of the cluster ([`Dcs::cluster_view`]) up to date without a read
//! per cycle, and wakes the HA loop when `leader`, `config`, `failover`, `sync` or `initialize`
//! change, so a released or expired leader key is acted on at once rather than at the next tick.
//! When the cached view cannot be vouched for (the watch is down or lags behind our own writes,
//! etcd did not answer our last request, no linearizable read for a ttl, or no leader, when a
//! race may follow), the view is read from etcd as before (see [`CacheState::vouches`]).
//!
//! An idle member thus sends one request per cycle: a lease keepalive, on one keepalive stream
//! kept open for the lease's lifetime. The leader's renewal is confirmed by the watched `leader`
//! key (our name on our lease) instead of a transaction, whenever the view vouches for it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, ResponseHeader, Txn, TxnOp, WatchOptions,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::Timing;

use super::keys::{KeyKind, Keys};
use super::model::{
    ClusterView, FailoverRequest, HistoryLine, LeaderKey, LeaderStatus, Member, MemberRecord,
    SyncState, Versioned,
};
use super::wake::WakeSignal;
use super::{Dcs, DcsError, LeaseRenewal, Wakeup};

/// Connection settings for [`EtcdDcs::connect`].
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    /// `host:port` or `http(s)://host:port` endpoints.
    pub endpoints: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub namespace: String,
    pub scope: String,
    /// This member's name (value of `leader`, suffix of `members/<name>`).
    pub name: String,
    /// The cluster's timing as the HA loop last derived it: the lease TTL, the request timeout
    /// (`retry_timeout`) and the HTTP/2 keepalive interval (from `loop_wait`). The client is
    /// rebuilt when `loop_wait` or `retry_timeout` change (`edit-config`).
    pub timing: watch::Receiver<Timing>,
}

#[derive(Debug, Default)]
struct LeaseState {
    id: Option<i64>,
    last_keepalive: Option<Instant>,
    /// Member value last written and the lease it was attached to.
    last_member: Option<(String, i64)>,
    /// The keepalive stream of lease `id`, kept open between renewals. Opening a stream per
    /// keepalive cost a stream setup and a second keepalive each time (the client's open sends
    /// one and waits for its answer). Dropped after any failure, so an answer that arrives late
    /// can never be taken for the answer to a later keepalive, and when the client is rebuilt
    /// (the stream runs on the client of that generation).
    keeper: Option<(i64, u64, LeaseKeeper, LeaseKeepAliveStream)>,
}

/// One key of the cluster prefix as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CachedKey {
    value: String,
    mod_revision: i64,
    lease: i64,
}

impl CachedKey {
    fn of(kv: &etcd_client::KeyValue) -> (String, CachedKey) {
        (
            text(kv.key()),
            CachedKey {
                value: text(kv.value()),
                mod_revision: kv.mod_revision(),
                lease: kv.lease(),
            },
        )
    }
}

/// The cluster prefix as the watch task keeps it: a linearizable read, then every change after
/// it, in revision order.
#[derive(Debug, Default)]
struct CacheState {
    keys: BTreeMap<String, CachedKey>,
    /// Every change of the prefix up to this revision is in `keys`.
    revision: i64,
    /// The watch stream is established on top of `keys` and has not failed since.
    live: bool,
    /// When `keys` last came from a linearizable read.
    read_at: Option<Instant>,
    /// The view last built from `keys` (an idle cluster's keys do not change between cycles,
    /// and parsing every member's JSON each cycle was most of an idle cycle's work).
    built: Option<Arc<ClusterView>>,
}

impl CacheState {
    /// Takes the result of a linearizable read at `revision`, unless the watch already brought
    /// the cache further.
    fn replace(
        &mut self,
        kvs: impl IntoIterator<Item = (String, CachedKey)>,
        revision: i64,
        at: Instant,
    ) {
        if revision < self.revision {
            return;
        }
        self.keys = kvs.into_iter().collect();
        self.revision = revision;
        self.read_at = Some(at);
        self.built = None;
    }

    /// Applies the events of one watch response (etcd never splits one revision's events across
    /// responses). Events the cache already has, from a read at a later revision, are skipped.
    /// `None` is a deletion; `revision` is the event's (for a deletion, the deleting revision).
    fn apply(&mut self, events: impl IntoIterator<Item = (String, i64, Option<CachedKey>)>) {
        let base = self.revision;
        for (key, revision, put) in events {
            if revision <= base {
                continue;
            }
            self.built = None;
            match put {
                Some(entry) => {
                    self.keys.insert(key, entry);
                }
                None => {
                    self.keys.remove(&key);
                }
            }
            self.revision = self.revision.max(revision);
        }
    }

    /// May the HA loop decide on this cache instead of reading etcd? Only if
    /// - the watch is established on it and has not failed since,
    /// - it contains every write this agent made (`written`): a cycle must see its own
    ///   acquisition, release and member updates,
    /// - etcd answered our last request (`reachable`): in an outage the view is unknown, as
    ///   with a failed read, rather than the last one seen,
    /// - a linearizable read refreshed it less than `ttl` ago: a watch that stalled without an
    ///   error is caught within one lease period, and so is any drift,
    /// - and it shows a leader. Without one, members may race for the key, and they decide
    ///   that (who is healthiest, is the lock free) on a linearizable read, as before.
    fn vouches(
        &self,
        leader_key: &str,
        written: i64,
        reachable: bool,
        ttl: Duration,
        now: Instant,
    ) -> bool {
        self.live
            && self.revision >= written
            && reachable
            && self
                .read_at
                .is_some_and(|at| now.saturating_duration_since(at) < ttl)
            && self
                .keys
                .get(leader_key)
                .is_some_and(|k| !k.value.is_empty())
    }
}

/// Logs reachability once per change of state instead of once per failed request.
#[derive(Debug)]
struct Reachability {
    reachable: AtomicBool,
}

impl Reachability {
    fn failed(&self, op: &str, err: &DcsError) {
        if err.is_transient() {
            if self.reachable.swap(false, Ordering::Relaxed) {
                warn!(operation = op, error = %crate::error::error_chain(err), "etcd became unreachable; retrying with backoff");
            } else {
                debug!(operation = op, error = %crate::error::error_chain(err), "etcd still unreachable");
            }
        } else {
            debug!(operation = op, error = %crate::error::error_chain(err), "etcd refused the operation");
        }
    }

    fn succeeded(&self) {
        if !self.reachable.swap(true, Ordering::Relaxed) {
            info!("etcd is reachable again");
        }
    }
}

/// [`Dcs`] over etcd v3.
/// How an etcd release token starts (the rest is the lease id).
const ETCD_TOKEN_PREFIX: &str = "etcd-lease:";

pub struct EtcdDcs {
    /// The client for the timing in force, with its generation (bumped on each rebuild).
    client: watch::Receiver<(u64, Client)>,
    keys: Keys,
    name: String,
    timing: watch::Receiver<Timing>,
    lease: tokio::sync::Mutex<LeaseState>,
    /// The `status` value this agent last wrote and when: an idle leader's optime does not
    /// change, and rewriting it every cycle was a third of an idle cluster's etcd requests.
    last_status: Mutex<Option<(String, Instant)>>,
    wake: Arc<WakeSignal>,
    reachability: Reachability,
    /// The cluster prefix, kept by the watch task.
    cache: Arc<Mutex<CacheState>>,
    /// The highest revision this agent's own writes created.
    written: Arc<AtomicI64>,
    watcher: tokio::task::JoinHandle<()>,
    /// Rebuilds the client when the timing changes.
    reconfigurer: tokio::task::JoinHandle<()>,
    /// The lease our `leader` key hangs on, for the fence guard's crash release.
    release_token: super::ReleaseToken,
}

impl Drop for EtcdDcs {
    fn drop(&mut self) {
        self.watcher.abort();
        self.reconfigurer.abort();
    }
}

fn classify(err: etcd_client::Error) -> DcsError {
    use etcd_client::Error as E;
    use tonic::Code;
    match err {
        E::GRpcStatus(status) => {
            let message = status.message().to_owned();
            match status.code() {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unknown
                | Code::Aborted => DcsError::unreachable(message),
                _ if message.contains("lease not found") => DcsError::LeaseLost,
                _ => DcsError::rejected(message),
            }
        }
        E::TransportError(e) => DcsError::unreachable(e),
        E::IoError(e) => DcsError::unreachable(e),
        // etcd answered: the lease expired (keys attached to it are gone). Re-grant, don't retry.
        E::LeaseKeepAliveError(e) if e.contains("not found") => DcsError::LeaseLost,
        E::LeaseKeepAliveError(e) | E::WatchError(e) => DcsError::unreachable(e),
        other => DcsError::rejected(other),
    }
}

/// HTTP/2 pings find a connection that died silently (an etcd host that lost power answers
/// nothing, not even a reset), so that the client moves to another endpoint and the watch is
/// set up again. They are sent after `interval` without a frame from etcd; a healthy agent
/// hears from etcd every `loop_wait` (a lease keepalive's answer), so an interval just above it
/// sends pings only on a connection that went quiet. At a fixed 2 s with `loop_wait` 2 they came
/// before every cycle of an idle agent: a round trip per cycle for nothing. A dead connection is
/// found after `loop_wait` + 1 s + the ping timeout, 5 s at `loop_wait` 2, as before.
fn keepalive_interval(loop_wait: Duration) -> Duration {
    loop_wait + Duration::from_secs(1)
}

/// An HTTP/2 ping is answered by etcd's transport, not queued behind requests.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the client is built from: the endpoints and credentials, fixed for the process.
#[derive(Debug, Clone)]
struct Endpoints {
    endpoints: Vec<String>,
    user: Option<(String, String)>,
}

/// The client options of a timing: connect and request timeouts (`retry_timeout`) and the
/// HTTP/2 keepalive (`loop_wait`). Only these two values of the timing shape the client.
fn client_options(timing: &Timing, user: Option<&(String, String)>) -> ConnectOptions {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(timing.retry_timeout)
        .with_timeout(timing.retry_timeout)
        .with_keep_alive(
            keepalive_interval(timing.loop_wait),
            timing.retry_timeout.min(KEEPALIVE_TIMEOUT),
        );
    if let Some((user, password)) = user {
        options = options.with_user(user.clone(), password.clone());
    }
    options
}

/// The part of a timing the client is built with.
fn client_shape(timing: &Timing) -> (Duration, Duration) {
    (timing.loop_wait, timing.retry_timeout)
}

async fn build_client(at: &Endpoints, timing: &Timing) -> Result<Client, DcsError> {
    Client::connect(
        &at.endpoints,
        Some(client_options(timing, at.user.as_ref())),
    )
    .await
    .map_err(classify)
}

/// Rebuilds the client whenever `loop_wait` or `retry_timeout` change, so that an `edit-config`
/// reaches the keepalive interval and the request timeout (they are options of the gRPC
/// channel). A rebuild that fails (authentication against an unreachable etcd) keeps the
/// previous client and is tried again.
async fn follow_timing(
    at: Endpoints,
    mut timing: watch::Receiver<Timing>,
    client: watch::Sender<(u64, Client)>,
) {
    let mut built = client_shape(&timing.borrow_and_update());
    let mut generation = 0;
    loop {
        let current = *timing.borrow_and_update();
        if client_shape(&current) == built {
            if timing.changed().await.is_err() {
                return;
            }
            continue;
        }
        match build_client(&at, &current).await {
            Ok(new) => {
                generation += 1;
                built = client_shape(&current);
                client.send_replace((generation, new));
                info!(
                    keepalive_interval = ?keepalive_interval(current.loop_wait),
                    request_timeout = ?current.retry_timeout,
                    "etcd client rebuilt for the new loop_wait and retry_timeout"
                );
            }
            Err(e) => {
                warn!(error = %crate::error::error_chain(&e), "cannot rebuild the etcd client for the new timing; keeping the previous one");
                tokio::time::sleep(current.retry_timeout).await;
            }
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl EtcdDcs {
    /// Builds the client and starts the watch task. Connecting is lazy: an unreachable etcd
    /// shows up as `Unreachable` errors from the operations, never as a failure here, except for
    /// malformed endpoints or failed authentication.
    pub async fn connect(settings: EtcdSettings) -> Result<Self, DcsError> {
        let endpoints: Vec<String> = settings
            .endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        let at = Endpoints {
            endpoints,
            user: settings.username.clone().zip(settings.password.clone()),
        };
        let timing = settings.timing;
        let initial = *timing.borrow();
        let client = build_client(&at, &initial).await?;
        let (client_tx, client) = watch::channel((0, client));
        let reconfigurer = tokio::spawn(follow_timing(at, timing.clone(), client_tx));
        let keys = Keys::new(&settings.namespace, &settings.scope);
        let wake = Arc::new(WakeSignal::default());
        let cache = Arc::new(Mutex::new(CacheState::default()));
        let written = Arc::new(AtomicI64::new(0));
        let watcher = tokio::spawn(watch_cluster(
            client.clone(),
            keys.clone(),
            wake.clone(),
            cache.clone(),
            written.clone(),
            timing.clone(),
        ));
        Ok(EtcdDcs {
            client,
            keys,
            name: settings.name,
            timing,
            lease: tokio::sync::Mutex::new(LeaseState::default()),
            last_status: Mutex::new(None),
            wake,
            reachability: Reachability {
                reachable: AtomicBool::new(true),
            },
            cache,
            written,
            watcher,
            reconfigurer,
            release_token: Default::default(),
        })
    }

    fn ttl(&self) -> Duration {
        self.timing.borrow().ttl
    }

    fn request_timeout(&self) -> Duration {
        self.timing.borrow().retry_timeout
    }

    /// The client built for the timing in force.
    fn client(&self) -> Client {
        self.client.borrow().1.clone()
    }

    /// Runs one request bounded by the request timeout, classifying and logging failures.
    async fn call<T, F>(&self, op: &str, fut: F) -> Result<T, DcsError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let request_timeout = self.request_timeout();
        let result = match tokio::time::timeout(request_timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(classify(err)),
            Err(_) => Err(DcsError::unreachable(format!(
                "no answer within {request_timeout:?}"
            ))),
        };
        match &result {
            Ok(_) => self.reachability.succeeded(),
            Err(err) => self.reachability.failed(op, err),
        }
        result
    }

    /// Deletes every key of the cluster (`patronictl remove`: a delete-range of `<base>/`).
    /// Returns how many keys were deleted.
    pub async fn delete_cluster(&self) -> Result<i64, DcsError> {
        let mut client = self.client();
        let response = self
            .call(
                "delete cluster",
                client.delete(
                    self.keys.prefix(),
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                ),
            )
            .await?;
        Ok(response.deleted())
    }

    /// The crash-release token: the lease `leader` hangs on while it is ours.
    fn leader_on_lease(&self, lease: Option<i64>) {
        self.release_token
            .set(lease.map(|id| format!("{ETCD_TOKEN_PREFIX}{id}")));
    }

    /// A change of leadership may have changed `status` behind our back: write it next time.
    fn forget_status(&self) {
        if let Ok(mut last) = self.last_status.lock() {
            *last = None;
        }
    }

    async fn grant_lease(&self, state: &mut LeaseState) -> Result<i64, DcsError> {
        let ttl = i64::try_from(self.ttl().as_secs()).unwrap_or(30).max(1);
        let mut client = self.client();
        let granted = self
            .call("lease grant", client.lease_grant(ttl, None))
            .await?;
        state.id = Some(granted.id());
        state.last_keepalive = Some(Instant::now());
        state.last_member = None;
        state.keeper = None;
        debug!(lease = granted.id(), ttl, "granted a new lease");
        Ok(granted.id())
    }

    /// Sends one keepalive on the lease's kept stream (opened first if needed); `Ok(granted
    /// ttl)`, or `LeaseLost` when etcd no longer knows the lease.
    async fn keepalive(&self, state: &mut LeaseState, id: i64) -> Result<Duration, DcsError> {
        let generation = self.client.borrow().0;
        let kept = match state.keeper.take() {
            Some((kept_id, kept_gen, keeper, stream))
                if kept_id == id && kept_gen == generation =>
            {
                Some((keeper, stream))
            }
            _ => None,
        };
        let (mut keeper, mut stream) = match kept {
            Some(kept) => kept,
            None => {
                let mut client = self.client();
                self.call("lease keepalive", client.lease_keep_alive(id))
                    .await?
            }
        };
        let response = self
            .call("lease keepalive", async {
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await?;
        match response {
            Some(r) if r.ttl() > 0 && r.id() == id => {
                state.keeper = Some((id, generation, keeper, stream));
                Ok(Duration::from_secs(r.ttl().unsigned_abs()))
            }
            Some(r) if r.id() != id => Err(DcsError::unreachable(format!(
                "keepalive answer for lease {} instead of {id}",
                r.id()
            ))),
            Some(_) => Err(DcsError::LeaseLost),
            None => Err(DcsError::unreachable(
                "keepalive stream closed without an answer",
            )),
        }
    }

    /// Records the revision one of our writes created: the cache must reach it before the HA
    /// loop may decide on it.
    fn wrote(&self, header: Option<&ResponseHeader>) {
        if let Some(h) = header {
            self.written.fetch_max(h.revision(), Ordering::Relaxed);
        }
    }

    /// The cached view, if it may stand in for a read (`CacheState::vouches`).
    fn cached_view(&self) -> Option<Arc<ClusterView>> {
        let mut cache = self.cache.lock().ok()?;
        let vouches = cache.vouches(
            &self.keys.leader(),
            self.written.load(Ordering::Relaxed),
            self.reachability.reachable.load(Ordering::Relaxed),
            self.ttl(),
            Instant::now(),
        );
        if !vouches {
            return None;
        }
        if let Some(view) = &cache.built {
            return Some(view.clone());
        }
        let view = Arc::new(build_view(
            &self.keys,
            cache
                .keys
                .iter()
                .map(|(k, v)| (k.as_str(), v.value.as_str(), v.mod_revision, v.lease)),
            cache.revision,
        ));
        cache.built = Some(view.clone());
        Some(view)
    }

    /// Does the cache, as the HA loop may decide on it, show `leader` with our name on `lease`?
    fn cache_confirms_leader(&self, lease: i64) -> bool {
        let Ok(cache) = self.cache.lock() else {
            return false;
        };
        let key = self.keys.leader();
        cache.vouches(
            &key,
            self.written.load(Ordering::Relaxed),
            self.reachability.reachable.load(Ordering::Relaxed),
            self.ttl(),
            Instant::now(),
        ) && cache
            .keys
            .get(&key)
            .is_some_and(|k| k.value == self.name && k.lease == lease)
    }

    async fn put(&self, op: &str, key: String, value: String) -> Result<(), DcsError> {
        let mut client = self.client();
        let response = self.call(op, client.put(key, value, None)).await?;
        self.wrote(response.header());
        Ok(())
    }

    /// Put (or delete when `value` is `None`) with an optional compare on the key's revision.
    async fn compare_and_set(
        &self,
        op: &str,
        key: String,
        value: Option<String>,
        expected_revision: Option<i64>,
    ) -> Result<bool, DcsError> {
        let action = match value {
            Some(v) => TxnOp::put(key.clone(), v, None),
            None => TxnOp::delete(key.clone(), None),
        };
        let mut client = self.client();
        let txn = match expected_revision {
            Some(0) => Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then([action]),
            Some(rev) => Txn::new()
                .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
                .and_then([action]),
            None => Txn::new().and_then([action]),
        };
        let response = self.call(op, client.txn(txn)).await?;
        if response.succeeded() {
            self.wrote(response.header());
        }
        Ok(response.succeeded())
    }
}

/// The view of the cluster from its keys: `(key, value, mod_revision, lease)`.
fn build_view<'a>(
    keys: &Keys,
    kvs: impl IntoIterator<Item = (&'a str, &'a str, i64, i64)>,
    revision: i64,
) -> ClusterView {
    let mut view = ClusterView {
        revision,
        ..Default::default()
    };
    let mut legacy_optime = None;
    for (key, value, mod_revision, lease) in kvs {
        let value = value.to_owned();
        match keys.classify(key) {
            KeyKind::Initialize => {
                view.initialize = Some(Versioned {
                    value,
                    revision: mod_revision,
                })
            }
            KeyKind::Config => {
                view.config = serde_json::from_str::<serde_json::Value>(&value)
                    .ok()
                    .filter(|v| v.is_object())
                    .map(|value| Versioned {
                        value,
                        revision: mod_revision,
                    })
            }
            KeyKind::Leader if !value.is_empty() => {
                view.leader = Some(LeaderKey {
                    name: value,
                    revision: mod_revision,
                    lease,
                })
            }
            KeyKind::Status => view.status = LeaderStatus::parse(&value),
            KeyKind::LegacyOptime => {
                legacy_optime = value.trim().parse::<u64>().ok();
            }
            KeyKind::Failover => {
                view.failover = FailoverRequest::parse(&value).map(|value| Versioned {
                    value,
                    revision: mod_revision,
                })
            }
            KeyKind::Sync => {
                view.sync = SyncState::parse(&value).map(|value| Versioned {
                    value,
                    revision: mod_revision,
                })
            }
            KeyKind::History => view.history = HistoryLine::parse_all(&value),
            KeyKind::Member(name) => {
                if let Some(record) = MemberRecord::parse(&value) {
                    view.members.push(Member {
                        name: name.to_owned(),
                        record,
                        revision: mod_revision,
                        lease,
                    });
                }
            }
            KeyKind::Failsafe => view.failsafe = super::model::parse_failsafe(&value),
            KeyKind::Leader | KeyKind::Other => {}
        }
    }
    if view.status.is_none() {
        view.status = legacy_optime.map(|optime| LeaderStatus {
            optime,
            ..Default::default()
        });
    }
    view.members.sort_by(|a, b| a.name.cmp(&b.name));
    view
}

#[async_trait]
impl Dcs for EtcdDcs {
    async fn cluster(&self) -> Result<ClusterView, DcsError> {
        let mut client = self.client();
        let read_at = Instant::now();
        let response = self
            .call(
                "read cluster",
                client.get(self.keys.prefix(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let revision = response.header().map(|h| h.revision()).unwrap_or(0);
        if let Ok(mut cache) = self.cache.lock() {
            cache.replace(response.kvs().iter().map(CachedKey::of), revision, read_at);
        }
        let kvs: Vec<(String, String, i64, i64)> = response
            .kvs()
            .iter()
            .map(|kv| {
                (
                    text(kv.key()),
                    text(kv.value()),
                    kv.mod_revision(),
                    kv.lease(),
                )
            })
            .collect();
        Ok(build_view(
            &self.keys,
            kvs.iter()
                .map(|(k, v, m, l)| (k.as_str(), v.as_str(), *m, *l)),
            revision,
        ))
    }

    async fn cluster_view(&self) -> Result<Arc<ClusterView>, DcsError> {
        match self.cached_view() {
            Some(view) => Ok(view),
            None => self.cluster().await.map(Arc::new),
        }
    }

    async fn race_initialize(&self, value: &str) -> Result<bool, DcsError> {
        self.compare_and_set(
            "race for initialize",
            self.keys.initialize(),
            Some(value.to_owned()),
            Some(0),
        )
        .await
    }

    async fn set_initialize(&self, sysid: &str) -> Result<(), DcsError> {
        self.put("set initialize", self.keys.initialize(), sysid.to_owned())
            .await
    }

    async fn cancel_initialize(&self, expected_revision: Option<i64>) -> Result<bool, DcsError> {
        self.compare_and_set(
            "delete initialize",
            self.keys.initialize(),
            None,
            expected_revision,
        )
        .await
    }

    async fn write_config(
        &self,
        config: &serde_json::Value,
        expected_revision: Option<i64>,
    ) -> Result<bool, DcsError> {
        self.compare_and_set(
            "write config",
            self.keys.config(),
            Some(config.to_string()),
            expected_revision,
        )
        .await
    }

    async fn acquire_leader(&self) -> Result<bool, DcsError> {
        self.forget_status();
        let mut state = self.lease.lock().await;
        let lease = match state.id {
            Some(id) => id,
            None => self.grant_lease(&mut state).await?,
        };
        let key = self.keys.leader();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                self.name.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let mut client = self.client();
        let response = self.call("acquire leader", client.txn(txn)).await?;
        if response.succeeded() {
            self.wrote(response.header());
            self.leader_on_lease(Some(lease));
        }
        Ok(response.succeeded())
    }

    async fn renew_leader(&self) -> Result<LeaseRenewal, DcsError> {
        let mut state = self.lease.lock().await;
        // A restarted agent has no lease yet but may find `leader` still naming it.
        let lease = match state.id {
            Some(id) => id,
            None => self.grant_lease(&mut state).await?,
        };
        // Taken before the request: etcd refreshes the lease no earlier than this instant, so
        // `sent_at + ttl` never overestimates how long the key is ours.
        let sent_at = Instant::now();
        let ttl = match self.keepalive(&mut state, lease).await {
            Ok(ttl) => ttl,
            Err(DcsError::LeaseLost) => {
                state.id = None;
                state.last_member = None;
                self.leader_on_lease(None);
                return Err(DcsError::LeaseLost);
            }
            Err(e) => return Err(e),
        };
        state.last_keepalive = Some(sent_at);
        // A live lease does not prove the key is still ours (it may have been deleted and
        // re-acquired by another member). The watched key proves it when the cache vouches for
        // it: it shows every change up to the watch's latency, so a deletion wakes the loop at
        // once. That is as strong as the compare below, which only proves the key was ours at
        // one instant within the cycle. Otherwise (watch down or behind our own writes, right
        // after acquiring, a linearizable re-read due): confirm holder and lease in one
        // linearizable compare.
        if self.cache_confirms_leader(lease) {
            self.leader_on_lease(Some(lease));
            return Ok(LeaseRenewal { sent_at, ttl });
        }
        let key = self.keys.leader();
        let confirm = Txn::new().when([
            Compare::value(key.clone(), CompareOp::Equal, self.name.clone()),
            Compare::lease(key.clone(), CompareOp::Equal, lease),
        ]);
        let mut client = self.client();
        if self
            .call("confirm leader", client.txn(confirm))
            .await?
            .succeeded()
        {
            self.leader_on_lease(Some(lease));
            return Ok(LeaseRenewal { sent_at, ttl });
        }
        // The key names us but hangs on another lease (our previous process's): re-attach it to
        // ours, as Patroni does, so it lives exactly as long as this process keeps renewing.
        let takeover = Txn::new()
            .when([Compare::value(
                key.clone(),
                CompareOp::Equal,
                self.name.clone(),
            )])
            .and_then([TxnOp::put(
                key,
                self.name.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let mut client = self.client();
        let response = self.call("re-attach leader", client.txn(takeover)).await?;
        if response.succeeded() {
            self.wrote(response.header());
            info!(lease, "re-attached the leader key to this process's lease");
            self.leader_on_lease(Some(lease));
            return Ok(LeaseRenewal { sent_at, ttl });
        }
        self.leader_on_lease(None);
        Err(DcsError::rejected(
            "the leader key is no longer held by this member",
        ))
    }

    async fn release_leader(&self) -> Result<(), DcsError> {
        self.forget_status();
        // Before the request: if its answer is lost the key may be gone, and the guard must not
        // release a key someone else may hold by then (its compare would protect it anyway).
        self.leader_on_lease(None);
        let key = self.keys.leader();
        let txn = Txn::new()
            .when([Compare::value(
                key.clone(),
                CompareOp::Equal,
                self.name.clone(),
            )])
            .and_then([TxnOp::delete(key, None)]);
        let mut client = self.client();
        let response = self.call("release leader", client.txn(txn)).await?;
        if response.succeeded() {
            self.wrote(response.header());
        }
        Ok(())
    }

    async fn member_key_lost(&self) {
        self.lease.lock().await.last_member = None;
    }

    async fn touch_member(&self, record: &MemberRecord) -> Result<(), DcsError> {
        let mut state = self.lease.lock().await;
        let lease = match state.id {
            Some(id) => id,
            None => self.grant_lease(&mut state).await?,
        };
        // While `leader` hangs on our lease (as the watch vouches; a key that expired or was
        // taken shows there too), its keepalives are the HA loop's renewals, which
        // skip cycles where the ttl leaves room (`ha::timing::renewal_due`): one sent here would
        // keep a lost host's lease alive longer than the loop's choice. Otherwise the leader's
        // renewal may already have refreshed the lease in this cycle.
        let fresh = self.cache_confirms_leader(lease)
            || state
                .last_keepalive
                .is_some_and(|at| at.elapsed() < Duration::from_secs(1));
        let lease = if fresh {
            lease
        } else {
            let sent_at = Instant::now();
            match self.keepalive(&mut state, lease).await {
                Ok(_) => {
                    state.last_keepalive = Some(sent_at);
                    lease
                }
                Err(DcsError::LeaseLost) => {
                    warn!(
                        lease,
                        "the member lease expired in etcd; granting a new one"
                    );
                    self.grant_lease(&mut state).await?
                }
                Err(e) => return Err(e),
            }
        };
        let value = record.encode();
        if state
            .last_member
            .as_ref()
            .is_some_and(|(v, l)| *v == value && *l == lease)
        {
            return Ok(());
        }
        let mut client = self.client();
        let response = self
            .call(
                "write member",
                client.put(
                    self.keys.member(&self.name),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
            )
            .await?;
        self.wrote(response.header());
        state.last_member = Some((value, lease));
        Ok(())
    }

    async fn write_status(&self, status: &LeaderStatus) -> Result<(), DcsError> {
        let value = serde_json::to_string(status)
            .map_err(|e| DcsError::rejected(format!("cannot encode status: {e}")))?;
        // Unchanged values are still rewritten once per ttl, so a key deleted or overwritten
        // behind our back is repaired within one lease period.
        let refresh = self.ttl();
        let unchanged = self.last_status.lock().is_ok_and(|last| {
            last.as_ref()
                .is_some_and(|(v, at)| *v == value && at.elapsed() < refresh)
        });
        if unchanged {
            return Ok(());
        }
        self.forget_status();
        self.put("write status", self.keys.status(), value.clone())
            .await?;
        if let Ok(mut last) = self.last_status.lock() {
            *last = Some((value, Instant::now()));
        }
        Ok(())
    }

    async fn write_history(&self, history: &[HistoryLine]) -> Result<(), DcsError> {
        self.put(
            "write history",
            self.keys.history(),
            HistoryLine::encode_all(history),
        )
        .await
    }

    async fn write_failover(
        &self,
        request: &FailoverRequest,
        expected_revision: Option<i64>,
    ) -> Result<bool, DcsError> {
        let value = serde_json::to_string(request)
            .map_err(|e| DcsError::rejected(format!("cannot encode failover: {e}")))?;
        self.compare_and_set(
            "write failover",
            self.keys.failover(),
            Some(value),
            expected_revision,
        )
        .await
    }

    async fn write_sync(
        &self,
        sync: Option<&SyncState>,
        expected_revision: Option<i64>,
    ) -> Result<bool, DcsError> {
        let value = sync
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| DcsError::rejected(format!("cannot encode sync: {e}")))?;
        self.compare_and_set("write sync", self.keys.sync(), value, expected_revision)
            .await
    }

    async fn revoke_lease(&self) -> Result<(), DcsError> {
        let mut state = self.lease.lock().await;
        let Some(id) = state.id.take() else {
            return Ok(());
        };
        self.leader_on_lease(None);
        state.last_member = None;
        state.keeper = None;
        let mut client = self.client();
        let response = self.call("revoke lease", client.lease_revoke(id)).await?;
        self.wrote(response.header());
        Ok(())
    }

    fn release_token(&self) -> watch::Receiver<Option<String>> {
        self.release_token.subscribe()
    }

    fn on_release_token(&self, sink: super::ReleaseTokenSink) {
        self.release_token.set_sink(sink);
    }

    async fn release_dead_leader(&self, token: &str) -> Result<bool, DcsError> {
        let lease: i64 = token
            .strip_prefix(ETCD_TOKEN_PREFIX)
            .and_then(|id| id.parse().ok())
            .ok_or_else(|| DcsError::rejected(format!("not an etcd release token: {token:?}")))?;
        // The key only if it still names us on the dead agent's lease: a restarted agent may
        // have re-attached it to its own lease meanwhile, or another member may hold it.
        let key = self.keys.leader();
        let txn = Txn::new()
            .when([
                Compare::value(key.clone(), CompareOp::Equal, self.name.clone()),
                Compare::lease(key.clone(), CompareOp::Equal, lease),
            ])
            .and_then([TxnOp::delete(key, None)]);
        let mut client = self.client();
        let released = self
            .call("release the dead leader", client.txn(txn))
            .await?
            .succeeded();
        // The member key hangs on the same lease and names a member that is gone; a lease that
        // ran out already is not an error.
        let mut client = self.client();
        match self
            .call("revoke the dead agent's lease", client.lease_revoke(lease))
            .await
        {
            Ok(_) | Err(DcsError::LeaseLost) => {}
            Err(e) => warn!(error = %e, lease, "cannot revoke the dead agent's lease"),
        }
        Ok(released)
    }

    async fn acquire_lease_key(&self, key: &str, value: &str) -> Result<bool, DcsError> {
        let mut state = self.lease.lock().await;
        let lease = match state.id {
            Some(id) => id,
            None => self.grant_lease(&mut state).await?,
        };
        let key = self.keys.key(key);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value.to_owned(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let mut client = self.client();
        let response = self.call("acquire lease key", client.txn(txn)).await?;
        if response.succeeded() {
            self.wrote(response.header());
        }
        Ok(response.succeeded())
    }

    async fn release_lease_key(&self, key: &str, value: &str) -> Result<(), DcsError> {
        let key = self.keys.key(key);
        let txn = Txn::new()
            .when([Compare::value(
                key.clone(),
                CompareOp::Equal,
                value.to_owned(),
            )])
            .and_then([TxnOp::delete(key, None)]);
        let mut client = self.client();
        let response = self.call("release lease key", client.txn(txn)).await?;
        if response.succeeded() {
            self.wrote(response.header());
        }
        Ok(())
    }

    async fn read_key(&self, key: &str) -> Result<Option<String>, DcsError> {
        let mut client = self.client();
        let response = self
            .call("read key", client.get(self.keys.key(key), None))
            .await?;
        Ok(response.kvs().first().map(|kv| text(kv.value())))
    }

    async fn write_key(&self, key: &str, value: &str) -> Result<(), DcsError> {
        self.put("write key", self.keys.key(key), value.to_owned())
            .await
    }

    async fn wait_for_change(&self, timeout: Duration) -> Wakeup {
        self.wake.wait(tokio::time::Instant::now() + timeout).await
    }
}

/// Keeps `cache` and wakes the HA loop, forever: a linearizable read of the cluster prefix, then
/// a watch from just after it, so no change is missed between the two. After a failed or
/// cancelled watch (compaction included) the cache is not live until the next read and watch,
/// retried with capped exponential backoff.
async fn watch_cluster(
    mut client: watch::Receiver<(u64, Client)>,
    keys: Keys,
    wake: Arc<WakeSignal>,
    cache: Arc<Mutex<CacheState>>,
    written: Arc<AtomicI64>,
    timing: watch::Receiver<Timing>,
) {
    let set_live = |live: bool| {
        if let Ok(mut c) = cache.lock() {
            c.live = live;
        }
    };
    let mut backoff = Duration::from_millis(100);
    let mut resynced = false;
    loop {
        let mut c = client.borrow_and_update().1.clone();
        let request_timeout = timing.borrow().retry_timeout;
        let read_at = Instant::now();
        let read = tokio::time::timeout(
            request_timeout,
            c.get(keys.prefix(), Some(GetOptions::new().with_prefix())),
        )
        .await;
        let start = match read {
            Ok(Ok(response)) => {
                let revision = response.header().map(|h| h.revision()).unwrap_or(0);
                if let Ok(mut cache) = cache.lock() {
                    // The watch starts from this read, so the cache must be exactly this read,
                    // even when etcd's revision went back (its data restored or replaced).
                    if revision < cache.revision {
                        info!(
                            revision,
                            cached = cache.revision,
                            "etcd's revision went back; starting the cluster cache over"
                        );
                        cache.revision = 0;
                        written.store(0, Ordering::Relaxed);
                    }
                    cache.replace(response.kvs().iter().map(CachedKey::of), revision, read_at);
                }
                revision
            }
            Ok(Err(err)) => {
                debug!(error = %err, "cannot read the cluster for the watch");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(_) => {
                debug!("no answer to the cluster read for the watch");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        // Something may have changed while we were not watching.
        if resynced {
            wake.raise(Wakeup::ClusterChanged);
        }
        resynced = true;
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start + 1);
        match c.watch(keys.prefix(), Some(options)).await {
            Ok(mut stream) => loop {
                let message = tokio::select! {
                    m = stream.message() => m,
                    // A rebuilt client (new timing): watch on it, read again first.
                    Ok(()) = client.changed() => {
                        debug!("etcd client rebuilt; moving the watch to it");
                        break;
                    }
                };
                match message {
                    Ok(Some(response)) => {
                        backoff = Duration::from_millis(100);
                        if response.compact_revision() > 0 || response.canceled() {
                            debug!(
                                compact_revision = response.compact_revision(),
                                reason = response.cancel_reason(),
                                "etcd cancelled the watch; reading the cluster again"
                            );
                            break;
                        }
                        if response.created() {
                            set_live(true);
                        }
                        let events: Vec<_> = response
                            .events()
                            .iter()
                            .filter_map(|e| e.kv().map(|kv| (e.event_type() == EventType::Put, kv)))
                            .collect();
                        // The cache first: a woken loop must find the change in it.
                        if let Ok(mut cache) = cache.lock() {
                            cache.apply(events.iter().map(|(put, kv)| {
                                let (key, entry) = CachedKey::of(kv);
                                (key, entry.mod_revision, put.then_some(entry))
                            }));
                        }
                        for (put, kv) in events {
                            let key = text(kv.key());
                            match keys.classify(&key) {
                                KeyKind::Leader => wake.raise(Wakeup::LeaderChanged),
                                KeyKind::Config
                                | KeyKind::Failover
                                | KeyKind::Sync
                                | KeyKind::Initialize => wake.raise(Wakeup::ClusterChanged),
                                _ => {}
                            }
                            if !put {
                                debug!(key, "watched key deleted");
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(err) => {
                        debug!(error = %err, "etcd watch stream failed");
                        break;
                    }
                }
            },
            Err(err) => debug!(error = %err, "cannot start etcd watch"),
        }
        set_live(false);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(value: &str, mod_revision: i64) -> CachedKey {
        CachedKey {
            value: value.into(),
            mod_revision,
            lease: 7,
        }
    }

    #[test]
    fn the_cache_applies_each_change_once_and_never_goes_back() {
        let t0 = Instant::now();
        let mut cache = CacheState::default();
        cache.replace([("/s/leader".to_owned(), entry("a", 5))], 5, t0);
        // One revision's events (a revoked lease deletes two keys at once) all apply.
        cache.apply([
            ("/s/members/a".to_owned(), 6, Some(entry("{}", 6))),
            ("/s/leader".to_owned(), 7, None),
            ("/s/members/a".to_owned(), 7, None),
        ]);
        assert_eq!(cache.revision, 7);
        assert!(cache.keys.is_empty());
        // A read at a later revision wins; events it already contains are skipped.
        cache.replace([("/s/leader".to_owned(), entry("b", 9))], 9, t0);
        cache.apply([("/s/leader".to_owned(), 8, Some(entry("c", 8)))]);
        assert_eq!(cache.keys["/s/leader"].value, "b");
        // A read older than the cache is ignored.
        cache.replace(std::iter::empty(), 8, t0);
        assert_eq!(cache.revision, 9);
        assert_eq!(cache.keys.len(), 1);
    }

    #[test]
    fn the_cache_vouches_only_when_live_current_reachable_recent_and_led() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut cache = CacheState::default();
        cache.replace([("/s/leader".to_owned(), entry("a", 5))], 5, t0);
        assert!(!cache.vouches("/s/leader", 5, true, ttl, t0), "not live");
        cache.live = true;
        assert!(cache.vouches("/s/leader", 5, true, ttl, t0));
        assert!(
            !cache.vouches("/s/leader", 6, true, ttl, t0),
            "our own write at revision 6 is not in it yet"
        );
        assert!(
            !cache.vouches("/s/leader", 5, false, ttl, t0),
            "etcd did not answer"
        );
        assert!(
            !cache.vouches("/s/leader", 5, true, ttl, t0 + ttl),
            "no linearizable read for a ttl"
        );
        cache.apply([("/s/leader".to_owned(), 6, None)]);
        assert!(
            !cache.vouches("/s/leader", 5, true, ttl, t0),
            "without a leader, a race may follow: read etcd"
        );
    }

    #[test]
    fn an_expired_lease_is_lost_not_unreachable() {
        assert!(matches!(
            classify(etcd_client::Error::LeaseKeepAliveError(
                "lease not found".into()
            )),
            DcsError::LeaseLost
        ));
        assert!(matches!(
            classify(etcd_client::Error::LeaseKeepAliveError(
                "stream closed".into()
            )),
            DcsError::Unreachable(_)
        ));
    }
}
