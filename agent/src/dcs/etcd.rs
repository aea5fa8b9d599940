//! The DCS over etcd v3 (gRPC, crate `etcd-client`), in Patroni's key layout.
//!
//! One lease per agent process, attached to both `members/<name>` and `leader`, so both vanish
//! together `ttl` after the last keepalive (`patroni-compat.md` §1.4). Every request is bounded by
//! `request_timeout` (the cluster's `retry_timeout`): a hung etcd can never hold the HA loop for
//! longer than that, which is what the fencing arithmetic in `ha::timing` relies on.
//!
//! A background task watches the cluster prefix and wakes the HA loop when `leader`, `config`,
//! `failover`, `sync` or `initialize` change, so a released or expired leader key is acted on at
//! once rather than at the next tick.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tracing::{debug, info, warn};

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
    pub ttl: Duration,
    /// Bound on every request (`retry_timeout`).
    pub request_timeout: Duration,
}

#[derive(Debug, Default)]
struct LeaseState {
    id: Option<i64>,
    last_keepalive: Option<Instant>,
    /// Member value last written and the lease it was attached to.
    last_member: Option<(String, i64)>,
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
                warn!(operation = op, error = %err, "etcd became unreachable; retrying with backoff");
            } else {
                debug!(operation = op, error = %err, "etcd still unreachable");
            }
        } else {
            debug!(operation = op, error = %err, "etcd refused the operation");
        }
    }

    fn succeeded(&self) {
        if !self.reachable.swap(true, Ordering::Relaxed) {
            info!("etcd is reachable again");
        }
    }
}

/// [`Dcs`] over etcd v3.
pub struct EtcdDcs {
    client: Client,
    keys: Keys,
    name: String,
    request_timeout: Duration,
    ttl: Mutex<Duration>,
    lease: tokio::sync::Mutex<LeaseState>,
    /// The `status` value this agent last wrote and when: an idle leader's optime does not
    /// change, and rewriting it every cycle was a third of an idle cluster's etcd requests.
    last_status: Mutex<Option<(String, Instant)>>,
    wake: Arc<WakeSignal>,
    reachability: Reachability,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for EtcdDcs {
    fn drop(&mut self) {
        self.watcher.abort();
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
                | Code::Aborted => DcsError::Unreachable(message),
                _ if message.contains("lease not found") => DcsError::LeaseLost,
                _ => DcsError::Rejected(message),
            }
        }
        E::TransportError(e) => DcsError::Unreachable(e.to_string()),
        E::IoError(e) => DcsError::Unreachable(e.to_string()),
        // etcd answered: the lease expired (keys attached to it are gone). Re-grant, don't retry.
        E::LeaseKeepAliveError(e) if e.contains("not found") => DcsError::LeaseLost,
        E::LeaseKeepAliveError(e) | E::WatchError(e) => DcsError::Unreachable(e),
        other => DcsError::Rejected(other.to_string()),
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
        let mut options = ConnectOptions::new()
            .with_connect_timeout(settings.request_timeout)
            .with_timeout(settings.request_timeout)
            .with_keep_alive(Duration::from_secs(2), settings.request_timeout);
        if let (Some(user), Some(password)) = (&settings.username, &settings.password) {
            options = options.with_user(user.clone(), password.clone());
        }
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(classify)?;
        let keys = Keys::new(&settings.namespace, &settings.scope);
        let wake = Arc::new(WakeSignal::default());
        let watcher = tokio::spawn(watch_cluster(client.clone(), keys.clone(), wake.clone()));
        Ok(EtcdDcs {
            client,
            keys,
            name: settings.name,
            request_timeout: settings.request_timeout,
            ttl: Mutex::new(settings.ttl),
            lease: tokio::sync::Mutex::new(LeaseState::default()),
            last_status: Mutex::new(None),
            wake,
            reachability: Reachability {
                reachable: AtomicBool::new(true),
            },
            watcher,
        })
    }

    fn ttl(&self) -> Duration {
        self.ttl
            .lock()
            .map(|t| *t)
            .unwrap_or(Duration::from_secs(30))
    }

    /// Runs one request bounded by the request timeout, classifying and logging failures.
    async fn call<T, F>(&self, op: &str, fut: F) -> Result<T, DcsError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let result = match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(classify(err)),
            Err(_) => Err(DcsError::Unreachable(format!(
                "no answer within {:?}",
                self.request_timeout
            ))),
        };
        match &result {
            Ok(_) => self.reachability.succeeded(),
            Err(err) => self.reachability.failed(op, err),
        }
        result
    }

    /// A change of leadership may have changed `status` behind our back: write it next time.
    fn forget_status(&self) {
        if let Ok(mut last) = self.last_status.lock() {
            *last = None;
        }
    }

    async fn grant_lease(&self, state: &mut LeaseState) -> Result<i64, DcsError> {
        let ttl = i64::try_from(self.ttl().as_secs()).unwrap_or(30).max(1);
        let mut client = self.client.clone();
        let granted = self
            .call("lease grant", client.lease_grant(ttl, None))
            .await?;
        state.id = Some(granted.id());
        state.last_keepalive = Some(Instant::now());
        state.last_member = None;
        debug!(lease = granted.id(), ttl, "granted a new lease");
        Ok(granted.id())
    }

    /// Sends one keepalive; `Ok(granted ttl)`, or `LeaseLost` when etcd no longer knows the lease.
    async fn keepalive(&self, id: i64) -> Result<Duration, DcsError> {
        let mut client = self.client.clone();
        let response = self
            .call("lease keepalive", async move {
                let (mut keeper, mut stream) = client.lease_keep_alive(id).await?;
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await?;
        match response {
            Some(r) if r.ttl() > 0 => Ok(Duration::from_secs(r.ttl().unsigned_abs())),
            Some(_) => Err(DcsError::LeaseLost),
            None => Err(DcsError::Unreachable(
                "keepalive stream closed without an answer".into(),
            )),
        }
    }

    async fn put(&self, op: &str, key: String, value: String) -> Result<(), DcsError> {
        let mut client = self.client.clone();
        self.call(op, client.put(key, value, None)).await.map(drop)
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
        let mut client = self.client.clone();
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
        Ok(response.succeeded())
    }

    fn build_view(&self, kvs: &[etcd_client::KeyValue], revision: i64) -> ClusterView {
        let mut view = ClusterView {
            revision,
            ..Default::default()
        };
        let mut legacy_optime = None;
        for kv in kvs {
            let key = text(kv.key());
            let value = text(kv.value());
            match self.keys.classify(&key) {
                KeyKind::Initialize => view.initialize = Some(value),
                KeyKind::Config => {
                    view.config = serde_json::from_str::<serde_json::Value>(&value)
                        .ok()
                        .filter(|v| v.is_object())
                        .map(|value| Versioned {
                            value,
                            revision: kv.mod_revision(),
                        })
                }
                KeyKind::Leader if !value.is_empty() => {
                    view.leader = Some(LeaderKey {
                        name: value,
                        revision: kv.mod_revision(),
                        lease: kv.lease(),
                    })
                }
                KeyKind::Status => view.status = LeaderStatus::parse(&value),
                KeyKind::LegacyOptime => {
                    legacy_optime = value.trim().parse::<u64>().ok();
                }
                KeyKind::Failover => {
                    view.failover = FailoverRequest::parse(&value).map(|value| Versioned {
                        value,
                        revision: kv.mod_revision(),
                    })
                }
                KeyKind::Sync => {
                    view.sync = SyncState::parse(&value).map(|value| Versioned {
                        value,
                        revision: kv.mod_revision(),
                    })
                }
                KeyKind::History => view.history = HistoryLine::parse_all(&value),
                KeyKind::Member(name) => {
                    if let Some(record) = MemberRecord::parse(&value) {
                        view.members.push(Member {
                            name: name.to_owned(),
                            record,
                            revision: kv.mod_revision(),
                            lease: kv.lease(),
                        });
                    }
                }
                KeyKind::Leader | KeyKind::Failsafe | KeyKind::Other => {}
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
}

#[async_trait]
impl Dcs for EtcdDcs {
    async fn cluster(&self) -> Result<ClusterView, DcsError> {
        let mut client = self.client.clone();
        let response = self
            .call(
                "read cluster",
                client.get(self.keys.prefix(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let revision = response.header().map(|h| h.revision()).unwrap_or(0);
        Ok(self.build_view(response.kvs(), revision))
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

    async fn cancel_initialize(&self) -> Result<(), DcsError> {
        let mut client = self.client.clone();
        self.call(
            "delete initialize",
            client.delete(self.keys.initialize(), None),
        )
        .await
        .map(drop)
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
        let mut client = self.client.clone();
        let response = self.call("acquire leader", client.txn(txn)).await?;
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
        let ttl = match self.keepalive(lease).await {
            Ok(ttl) => ttl,
            Err(DcsError::LeaseLost) => {
                state.id = None;
                state.last_member = None;
                return Err(DcsError::LeaseLost);
            }
            Err(e) => return Err(e),
        };
        state.last_keepalive = Some(sent_at);
        // A live lease does not prove the key is still ours (it may have been deleted and
        // re-acquired by another member): confirm holder and lease in one linearizable compare.
        let key = self.keys.leader();
        let confirm = Txn::new().when([
            Compare::value(key.clone(), CompareOp::Equal, self.name.clone()),
            Compare::lease(key.clone(), CompareOp::Equal, lease),
        ]);
        let mut client = self.client.clone();
        if self
            .call("confirm leader", client.txn(confirm))
            .await?
            .succeeded()
        {
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
        let mut client = self.client.clone();
        if self
            .call("re-attach leader", client.txn(takeover))
            .await?
            .succeeded()
        {
            info!(lease, "re-attached the leader key to this process's lease");
            return Ok(LeaseRenewal { sent_at, ttl });
        }
        Err(DcsError::Rejected(
            "the leader key is no longer held by this member".into(),
        ))
    }

    async fn release_leader(&self) -> Result<(), DcsError> {
        self.forget_status();
        let key = self.keys.leader();
        let txn = Txn::new()
            .when([Compare::value(
                key.clone(),
                CompareOp::Equal,
                self.name.clone(),
            )])
            .and_then([TxnOp::delete(key, None)]);
        let mut client = self.client.clone();
        self.call("release leader", client.txn(txn)).await.map(drop)
    }

    async fn touch_member(&self, record: &MemberRecord) -> Result<(), DcsError> {
        let mut state = self.lease.lock().await;
        let lease = match state.id {
            Some(id) => id,
            None => self.grant_lease(&mut state).await?,
        };
        // The leader's renewal already refreshed the lease in this cycle.
        let fresh = state
            .last_keepalive
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1));
        let lease = if fresh {
            lease
        } else {
            let sent_at = Instant::now();
            match self.keepalive(lease).await {
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
        if state.last_member.as_ref() == Some(&(value.clone(), lease)) {
            return Ok(());
        }
        let mut client = self.client.clone();
        self.call(
            "write member",
            client.put(
                self.keys.member(&self.name),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        state.last_member = Some((value, lease));
        Ok(())
    }

    async fn write_status(&self, status: &LeaderStatus) -> Result<(), DcsError> {
        let value = serde_json::to_string(status)
            .map_err(|e| DcsError::Rejected(format!("cannot encode status: {e}")))?;
        // Unchanged values are still rewritten once per ttl, so a key deleted or overwritten
        // behind our back is repaired within one lease period.
        let refresh = self
            .ttl
            .lock()
            .map(|t| *t)
            .unwrap_or(Duration::from_secs(10));
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
            .map_err(|e| DcsError::Rejected(format!("cannot encode failover: {e}")))?;
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
            .map_err(|e| DcsError::Rejected(format!("cannot encode sync: {e}")))?;
        self.compare_and_set("write sync", self.keys.sync(), value, expected_revision)
            .await
    }

    async fn revoke_lease(&self) -> Result<(), DcsError> {
        let mut state = self.lease.lock().await;
        let Some(id) = state.id.take() else {
            return Ok(());
        };
        state.last_member = None;
        let mut client = self.client.clone();
        self.call("revoke lease", client.lease_revoke(id))
            .await
            .map(drop)
    }

    fn set_ttl(&self, ttl: Duration) {
        if let Ok(mut current) = self.ttl.lock() {
            *current = ttl;
        }
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
        let mut client = self.client.clone();
        let response = self.call("acquire lease key", client.txn(txn)).await?;
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
        let mut client = self.client.clone();
        self.call("release lease key", client.txn(txn))
            .await
            .map(drop)
    }

    async fn read_key(&self, key: &str) -> Result<Option<String>, DcsError> {
        let mut client = self.client.clone();
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

/// Watches the cluster prefix forever, reconnecting with capped exponential backoff.
async fn watch_cluster(client: Client, keys: Keys, wake: Arc<WakeSignal>) {
    let mut backoff = Duration::from_millis(100);
    let mut next_revision: Option<i64> = None;
    loop {
        let mut options = WatchOptions::new().with_prefix();
        if let Some(rev) = next_revision {
            options = options.with_start_revision(rev);
        }
        let mut c = client.clone();
        match c.watch(keys.prefix(), Some(options)).await {
            Ok(mut stream) => {
                // Something may have changed while we were not watching.
                if next_revision.is_some() {
                    wake.raise(Wakeup::ClusterChanged);
                }
                loop {
                    match stream.message().await {
                        Ok(Some(response)) => {
                            backoff = Duration::from_millis(100);
                            if response.compact_revision() > 0 || response.canceled() {
                                next_revision = None;
                                wake.raise(Wakeup::ClusterChanged);
                                break;
                            }
                            for event in response.events() {
                                let Some(kv) = event.kv() else { continue };
                                next_revision = Some(kv.mod_revision() + 1);
                                let key = text(kv.key());
                                match keys.classify(&key) {
                                    KeyKind::Leader => wake.raise(Wakeup::LeaderChanged),
                                    KeyKind::Config
                                    | KeyKind::Failover
                                    | KeyKind::Sync
                                    | KeyKind::Initialize => wake.raise(Wakeup::ClusterChanged),
                                    _ => {}
                                }
                                if event.event_type() == EventType::Delete {
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
                }
            }
            Err(err) => debug!(error = %err, "cannot start etcd watch"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
