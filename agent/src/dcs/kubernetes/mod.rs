//! The DCS over the Kubernetes API (kube-rs), for agents running in Pods (`docs/kubernetes.md`).
//!
//! - [`lease`]: the leader is a `coordination.k8s.io/v1` Lease `<scope>-leader`; acquired by
//!   create (or by replace of a released/expired one), renewed by replace with the last seen
//!   `resourceVersion`; expiry judged by our own clock.
//! - [`members`]: member records in the `status` annotation of each member's Pod, role labels.
//! - [`state`]: `config`, `initialize`, `history`, `failover`, `sync`, `status` in ConfigMaps.
//! - [`watch`]: watches of the Lease, the member Pods and the ConfigMaps wake the HA loop.
//!
//! Every request is bounded by `request_timeout` (the cluster's `retry_timeout`), as in etcd
//! mode, so a hung API server cannot hold the HA loop past the fence deadline. The API server
//! never expires anything on its own, so unlike etcd mode nothing disappears when an agent
//! dies: its Lease is judged expired by the others' clocks, and its member record stays on its
//! Pod until the Pod goes away or the agent stops cleanly.

/// The Lease expiry rule, shared with the controller's election.
pub use pgwarden_api::lease;
pub mod members;
pub mod state;
mod watch;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use tracing::{debug, info, warn};

use self::lease::{parse_resource_version, LeaseRecord, LeaseState, LeaseTracker};
use self::members::{PodMark, RoleLabels};
use self::state::{Expect, StateMap};
use super::model::{
    ClusterView, FailoverRequest, HistoryLine, LeaderKey, LeaderStatus, MemberRecord, SyncState,
    Versioned,
};
use super::wake::WakeSignal;
use super::{Dcs, DcsError, LeaseRenewal, Wakeup};

/// Settings for [`KubeDcs::connect`], from the `kubernetes` section.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// `None`: the client's default (the service account's namespace in a Pod, the
    /// kubeconfig context's otherwise, else `default`).
    pub namespace: Option<String>,
    pub scope: String,
    /// This member's name = its Pod's name.
    pub name: String,
    /// `kubernetes.labels`; the scope label is added.
    pub labels: BTreeMap<String, String>,
    pub scope_label: String,
    pub role: RoleLabels,
    /// Lease name (default `<scope>-leader`).
    pub lease_name: String,
    /// The cluster's timing as the HA loop last derived it: the Lease duration (`ttl`) and the
    /// bound on every request (`retry_timeout`).
    pub timing: tokio::sync::watch::Receiver<crate::config::Timing>,
    /// Run the watches (the agent does; one-shot callers need not). Without them the Lease is
    /// observed only by this client's own reads and writes.
    pub watch: bool,
}

impl KubeSettings {
    /// Builds the settings from a validated configuration in Kubernetes mode.
    pub fn from_config(
        config: &crate::config::Config,
        timing: tokio::sync::watch::Receiver<crate::config::Timing>,
    ) -> Option<KubeSettings> {
        let k = config.kubernetes.as_ref()?;
        Some(KubeSettings {
            namespace: k.namespace.clone().filter(|n| !n.is_empty()),
            scope: config.scope.clone(),
            name: config.name.clone(),
            labels: k.labels.clone(),
            scope_label: k.scope_label.clone(),
            role: RoleLabels {
                key: k.role_label.clone(),
                leader: k.leader_label_value.clone(),
                follower: k.follower_label_value.clone(),
                standby_leader: k
                    .standby_leader_label_value
                    .clone()
                    .unwrap_or_else(|| k.leader_label_value.clone()),
            },
            lease_name: k
                .leader_lease
                .clone()
                .unwrap_or_else(|| format!("{}-leader", config.scope)),
            timing,
            watch: true,
        })
    }

    /// The labels that select the members and that the agent's ConfigMaps carry.
    pub fn selector_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        labels.insert(self.scope_label.clone(), self.scope.clone());
        labels
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
                warn!(operation = op, error = %crate::error::error_chain(err), "the Kubernetes API became unreachable");
            } else {
                debug!(operation = op, error = %crate::error::error_chain(err), "the Kubernetes API is still unreachable");
            }
        } else {
            debug!(operation = op, error = %crate::error::error_chain(err), "the Kubernetes API refused the operation");
        }
    }

    fn succeeded(&self) {
        if !self.reachable.swap(true, Ordering::Relaxed) {
            info!("the Kubernetes API is reachable again");
        }
    }
}

/// HTTP status of an API error.
fn status_code(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(response) => Some(response.code),
        _ => None,
    }
}

/// Transport failures, timeouts, throttling and server errors may pass: `Unreachable`. Any
/// other answer (403 Forbidden, 422 Invalid, ...) is a refusal.
fn classify(err: kube::Error) -> DcsError {
    match err {
        kube::Error::Api(response) if response.code == 429 || response.code >= 500 => {
            DcsError::unreachable(format!("{} {}", response.code, response.message))
        }
        kube::Error::Api(response) => DcsError::rejected(format!(
            "{} {}: {}",
            response.code, response.reason, response.message
        )),
        kube::Error::HyperError(e) => DcsError::unreachable(e),
        kube::Error::Service(e) => DcsError::unreachable(e),
        kube::Error::ReadEvents(e) => DcsError::unreachable(e),
        other => DcsError::rejected(other),
    }
}

/// A request's outcome before classification: 409/404 matter to the callers, and so do 401/403
/// to the leader's renewal.
enum Failure {
    Conflict,
    NotFound,
    /// 401 Unauthorized or 403 Forbidden: the server refused to look at the object (an
    /// authorizer still filling its cache after a restart, a RoleBinding being replaced).
    Forbidden(DcsError),
    Other(DcsError),
}

impl From<Failure> for DcsError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Conflict => DcsError::rejected("409 Conflict"),
            Failure::NotFound => DcsError::rejected("404 Not Found"),
            Failure::Forbidden(e) | Failure::Other(e) => e,
        }
    }
}

impl Failure {
    /// For the leader's own renewal: a 401/403 says nothing about who holds the Lease (the
    /// server did not read it), so the renewal is unconfirmed, as when the server is out of
    /// reach. The HA loop then keeps the fence deadline of the last confirmed renewal: a refusal
    /// that lasts demotes the leader at that deadline, a transient one is survived by the next
    /// renewal instead of losing the leadership at once.
    fn unconfirmed_if_forbidden(self) -> Failure {
        match self {
            Failure::Forbidden(e) => Failure::Other(DcsError::unreachable(format!(
                "refused by the API server, which did not read the Lease: {}",
                crate::error::error_chain(&e)
            ))),
            other => other,
        }
    }
}

fn micro_time_now() -> MicroTime {
    MicroTime(chrono::Utc::now())
}

fn record_of(lease: &Lease) -> LeaseRecord {
    let spec = lease.spec.clone().unwrap_or_default();
    let fmt = |t: &MicroTime| t.0.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    LeaseRecord {
        resource_version: lease.metadata.resource_version.clone().unwrap_or_default(),
        holder: spec.holder_identity.filter(|h| !h.is_empty()),
        renew_time: spec.renew_time.as_ref().map(fmt),
        duration: Duration::from_secs(
            spec.lease_duration_seconds
                .unwrap_or(0)
                .max(0)
                .unsigned_abs()
                .into(),
        ),
        transitions: spec.lease_transitions.unwrap_or(0),
        acquire_time: spec.acquire_time.as_ref().map(fmt),
    }
}

/// Removes the role label of the Pods in `stale` ([`members::stale_leader_pods`]; with `None`,
/// lists the members first). Runs beside the HA loop, never delaying it.
async fn unlabel_former_leaders(
    pods: Api<Pod>,
    selector: String,
    role: RoleLabels,
    own: String,
    stale: Option<Vec<(String, String)>>,
    timeout: Duration,
) {
    let stale = match stale {
        Some(s) => s,
        None => {
            let lp = ListParams::default().labels(&selector);
            match tokio::time::timeout(timeout, pods.list(&lp)).await {
                Ok(Ok(list)) => members::stale_leader_pods(&list.items, &role, &own),
                Ok(Err(e)) => {
                    debug!(error = %e, "could not list the member Pods to clear former leaders' role labels");
                    return;
                }
                Err(_) => return,
            }
        }
    };
    for (name, resource_version) in stale {
        let patch = Patch::Merge(members::unlabel_patch(&role.key, &resource_version));
        let params = PatchParams::default();
        let request = pods.patch(&name, &params, &patch);
        match tokio::time::timeout(timeout, request).await {
            Ok(Ok(_)) => info!(
                pod = %name,
                label = %role.key,
                "removed the leader's role label from a Pod that does not hold the leader Lease"
            ),
            // Its agent rewrote the Pod meanwhile: it labels itself, the next read tells.
            Ok(Err(e)) if matches!(status_code(&e), Some(404 | 409)) => {}
            Ok(Err(e)) => {
                warn!(pod = %name, error = %e, "could not remove a former leader's role label")
            }
            Err(_) => warn!(pod = %name, "no answer removing a former leader's role label"),
        }
    }
}

/// [`Dcs`] over the Kubernetes API.
pub struct KubeDcs {
    settings: KubeSettings,
    namespace: String,
    leases: Api<Lease>,
    pods: Api<Pod>,
    configmaps: Api<ConfigMap>,
    /// Shared with the Lease watch, which keeps the observation fresh between reads.
    tracker: Arc<Mutex<LeaseTracker>>,
    /// The Lease object from our last read or write.
    last_lease: Mutex<Option<Lease>>,
    /// What our Pod carries as far as we know; `None` = unknown, rewrite.
    own_mark: tokio::sync::Mutex<Option<PodMark>>,
    /// Serializes our Lease writes.
    lease_writes: tokio::sync::Mutex<()>,
    wake: Arc<WakeSignal>,
    reachability: Reachability,
    watchers: Vec<tokio::task::JoinHandle<()>>,
    /// A task clearing former leaders' role labels is running.
    unlabelling: Arc<AtomicBool>,
    /// Names this process in the Lease it writes ([`HOLDER_INCARNATION`]).
    incarnation: String,
    /// Our release token while the Lease may name us, for the fence guard's crash release.
    release_token: super::ReleaseToken,
}

/// How a Kubernetes release token starts; the rest is the agent's incarnation.
const KUBE_TOKEN_PREFIX: &str = "k8s-lease-incarnation:";

/// The Lease annotation naming the agent process that last wrote it as holder. A crash release
/// clears the holder only while this names the dead agent: unlike the resourceVersion, the
/// guard knows it before the write, so a renewal applied just before the agent was killed (its
/// answer never read) does not hide the Lease from the release.
const HOLDER_INCARNATION: &str = "pgwarden.io/holder-incarnation";

/// Unique per agent process: the PID and the start time.
fn new_incarnation() -> String {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}-{}", std::process::id(), since_epoch.as_nanos())
}

fn holder_of(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref()
}

fn incarnation_of(lease: &Lease) -> Option<&str> {
    lease
        .metadata
        .annotations
        .as_ref()?
        .get(HOLDER_INCARNATION)
        .map(String::as_str)
}

impl Drop for KubeDcs {
    fn drop(&mut self) {
        for w in &self.watchers {
            w.abort();
        }
    }
}

impl KubeDcs {
    /// Builds the client from the environment — the service account inside a Pod, the
    /// kubeconfig (`KUBECONFIG`, `~/.kube/config`) outside — and starts the watches. Nothing is
    /// requested yet: an unreachable API server shows up as `Unreachable` errors later.
    pub async fn connect(settings: KubeSettings) -> Result<Self, DcsError> {
        let config = kube::Config::infer()
            .await
            .map_err(|e| DcsError::rejected(format!("no usable Kubernetes client configuration (in-cluster service account or kubeconfig): {e}")))?;
        let namespace = settings
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config)
            .map_err(|e| DcsError::rejected(format!("cannot build the Kubernetes client: {e}")))?;
        Ok(Self::with_client(client, namespace, settings))
    }

    /// Uses an existing client (tests, other callers with their own configuration).
    pub fn with_client(client: kube::Client, namespace: String, settings: KubeSettings) -> Self {
        let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let configmaps: Api<ConfigMap> = Api::namespaced(client, &namespace);
        let tracker = Arc::new(Mutex::new(LeaseTracker::default()));
        let wake = Arc::new(WakeSignal::default());
        let selector = members::label_selector(&settings.selector_labels());
        let watchers = if settings.watch {
            vec![
                tokio::spawn(watch::lease(
                    leases.clone(),
                    settings.lease_name.clone(),
                    tracker.clone(),
                    wake.clone(),
                )),
                tokio::spawn(watch::pods(
                    pods.clone(),
                    selector.clone(),
                    settings.role.key.clone(),
                    wake.clone(),
                )),
                tokio::spawn(watch::configmaps(
                    configmaps.clone(),
                    selector,
                    StateMap::Status.name(&settings.scope),
                    wake.clone(),
                )),
            ]
        } else {
            Vec::new()
        };
        KubeDcs {
            settings,
            namespace,
            leases,
            pods,
            configmaps,
            tracker,
            last_lease: Mutex::new(None),
            own_mark: tokio::sync::Mutex::new(None),
            lease_writes: tokio::sync::Mutex::new(()),
            wake,
            reachability: Reachability {
                reachable: AtomicBool::new(true),
            },
            watchers,
            unlabelling: Arc::new(AtomicBool::new(false)),
            incarnation: new_incarnation(),
            release_token: Default::default(),
        }
    }

    /// While we hold the Lease, no other Pod may keep the leader's role label: a dead leader's
    /// Pod would otherwise stay behind the primary Service until it is deleted. Clears the
    /// label of those in `listed` (or of those found by a fresh list), in the background.
    fn unlabel_former_leaders(&self, listed: Option<&[Pod]>) {
        let stale = listed
            .map(|pods| members::stale_leader_pods(pods, &self.settings.role, &self.settings.name));
        if stale.as_ref().is_some_and(Vec::is_empty) {
            return;
        }
        if self.unlabelling.swap(true, Ordering::AcqRel) {
            return;
        }
        let busy = self.unlabelling.clone();
        let task = unlabel_former_leaders(
            self.pods.clone(),
            members::label_selector(&self.settings.selector_labels()),
            self.settings.role.clone(),
            self.settings.name.clone(),
            stale,
            self.settings.timing.borrow().retry_timeout,
        );
        tokio::spawn(async move {
            task.await;
            busy.store(false, Ordering::Release);
        });
    }

    fn holds_lease(&self) -> bool {
        matches!(self.lease_state(), LeaseState::Held { holder, .. } if holder == self.settings.name)
    }

    /// The namespace everything lives in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn ttl(&self) -> Duration {
        self.settings.timing.borrow().ttl
    }

    fn observe_lease(&self, lease: Option<&Lease>) {
        let record = lease.map(record_of);
        let ours = lease.is_some_and(|l| {
            holder_of(l) == Some(self.settings.name.as_str())
                && incarnation_of(l) == Some(self.incarnation.as_str())
        });
        self.set_release_token(ours);
        if let Ok(mut t) = self.tracker.lock() {
            t.observe(record, Instant::now());
        }
        if let Ok(mut last) = self.last_lease.lock() {
            *last = lease.cloned();
        }
    }

    fn set_release_token(&self, held: bool) {
        self.release_token
            .set(held.then(|| format!("{KUBE_TOKEN_PREFIX}{}", self.incarnation)));
    }

    /// Before a write that names us holder: the guard must know the token before the write
    /// can be applied, not after its answer (which a kill -9 may keep us from reading). A write
    /// that fails leaves it set; it matches a Lease only if one of our writes was applied.
    fn expect_holding(&self) {
        self.set_release_token(true);
    }

    /// The whole Lease object as we last read or wrote it, if it is at `resource_version`:
    /// writing on top of it keeps metadata that others put on the Lease (labels, owner
    /// references). Otherwise (the watch saw a newer version) a minimal object is used.
    fn lease_base(&self, record: &LeaseRecord) -> Lease {
        let known = self
            .last_lease
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .filter(|l| l.metadata.resource_version.as_deref() == Some(&record.resource_version));
        if let Some(lease) = known {
            return lease;
        }
        let mut base = Lease::default();
        base.metadata.name = Some(self.settings.lease_name.clone());
        base.metadata.resource_version = Some(record.resource_version.clone());
        base.metadata.labels = Some(self.settings.selector_labels());
        base.spec = Some(LeaseSpec {
            holder_identity: record.holder.clone(),
            lease_transitions: Some(record.transitions),
            acquire_time: record
                .acquire_time
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| MicroTime(t.with_timezone(&chrono::Utc))),
            ..Default::default()
        });
        base
    }

    fn lease_state(&self) -> LeaseState {
        self.tracker
            .lock()
            .map(|t| t.state(&self.settings.name, Instant::now()))
            .unwrap_or(LeaseState::Unknown)
    }

    fn lease_record(&self) -> Option<LeaseRecord> {
        self.tracker.lock().ok().and_then(|t| t.record().cloned())
    }

    /// Runs one request bounded by the request timeout; 409 and 404 are kept apart.
    async fn call<T, F>(&self, op: &str, fut: F) -> Result<T, Failure>
    where
        F: std::future::Future<Output = Result<T, kube::Error>>,
    {
        let timeout = self.settings.timing.borrow().retry_timeout;
        let result = match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => match status_code(&err) {
                Some(409) => Err(Failure::Conflict),
                Some(404) => Err(Failure::NotFound),
                Some(401 | 403) => Err(Failure::Forbidden(classify(err))),
                _ => Err(Failure::Other(classify(err))),
            },
            Err(_) => Err(Failure::Other(DcsError::unreachable(format!(
                "no answer within {timeout:?}"
            )))),
        };
        match &result {
            Ok(_) | Err(Failure::Conflict) | Err(Failure::NotFound) => {
                self.reachability.succeeded()
            }
            Err(Failure::Forbidden(err)) | Err(Failure::Other(err)) => {
                self.reachability.failed(op, err)
            }
        }
        result
    }

    async fn get_lease(&self) -> Result<Option<Lease>, DcsError> {
        Ok(self.read_lease().await?)
    }

    async fn read_lease(&self) -> Result<Option<Lease>, Failure> {
        let name = &self.settings.lease_name;
        let lease = self
            .call("read the leader lease", self.leases.get_opt(name))
            .await?;
        self.observe_lease(lease.as_ref());
        Ok(lease)
    }

    /// The Lease as we would write it for holding it, built on `current`.
    fn held_lease(&self, current: Option<&Lease>, take_over: bool) -> Lease {
        let mut lease = current.cloned().unwrap_or_else(|| {
            let mut l = Lease::default();
            l.metadata.name = Some(self.settings.lease_name.clone());
            l.metadata.labels = Some(self.settings.selector_labels());
            l
        });
        let now = micro_time_now();
        let mut spec = lease.spec.take().unwrap_or_default();
        let ttl = i32::try_from(self.ttl().as_secs()).unwrap_or(30).max(1);
        if take_over || spec.acquire_time.is_none() {
            let previous = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
            if current.is_some() && previous != Some(self.settings.name.as_str()) {
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.acquire_time = Some(now.clone());
        }
        lease
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(HOLDER_INCARNATION.to_owned(), self.incarnation.clone());
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.settings.name.clone()),
            lease_duration_seconds: Some(ttl),
            renew_time: Some(now),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0)),
            acquire_time: spec.acquire_time,
        });
        lease
    }

    /// Replace with `lease`'s `resourceVersion`; `Ok(None)` on 409.
    async fn replace_lease(&self, op: &str, lease: &Lease) -> Result<Option<Lease>, DcsError> {
        Ok(self.try_replace_lease(op, lease).await?)
    }

    /// [`Self::replace_lease`], keeping a 401/403 apart.
    async fn try_replace_lease(&self, op: &str, lease: &Lease) -> Result<Option<Lease>, Failure> {
        match self
            .call(
                op,
                self.leases
                    .replace(&self.settings.lease_name, &PostParams::default(), lease),
            )
            .await
        {
            Ok(written) => {
                self.observe_lease(Some(&written));
                Ok(Some(written))
            }
            Err(Failure::Conflict) => Ok(None),
            Err(Failure::NotFound) => Err(Failure::Other(DcsError::rejected(format!(
                "the leader Lease {} no longer exists",
                self.settings.lease_name
            )))),
            Err(Failure::Forbidden(e)) => Err(Failure::Forbidden(e)),
            Err(Failure::Other(e)) => {
                // The write may or may not have been applied: re-read before trusting the
                // observation again.
                if let Ok(mut t) = self.tracker.lock() {
                    t.forget();
                }
                Err(Failure::Other(e))
            }
        }
    }

    /// Writes annotations of one of the state ConfigMaps under `expect` (checked against
    /// `check_key`). `Ok(false)`: the expectation failed.
    async fn write_state(
        &self,
        op: &str,
        map: StateMap,
        updates: &[(&str, Option<String>)],
        check_key: &str,
        expect: Expect,
    ) -> Result<bool, DcsError> {
        let name = map.name(&self.settings.scope);
        let labels = self.settings.selector_labels();
        // Conflicts with writers of other annotations are retried; a few rounds settle them.
        for _ in 0..5 {
            let current = self.call(op, self.configmaps.get_opt(&name)).await?;
            if !expect.holds(current.as_ref(), check_key) {
                return Ok(false);
            }
            let next = state::updated(current.as_ref(), &name, &labels, updates);
            let written = match &current {
                None => {
                    self.call(op, self.configmaps.create(&PostParams::default(), &next))
                        .await
                }
                Some(_) => {
                    self.call(
                        op,
                        self.configmaps
                            .replace(&name, &PostParams::default(), &next),
                    )
                    .await
                }
            };
            match written {
                Ok(_) => return Ok(true),
                Err(Failure::Conflict) if matches!(expect, Expect::Revision(_)) => {
                    return Ok(false)
                }
                Err(Failure::Conflict) | Err(Failure::NotFound) => continue,
                Err(f) => return Err(f.into()),
            }
        }
        Err(DcsError::rejected(format!(
            "{op}: ConfigMap {name} kept changing under concurrent writers"
        )))
    }

    fn build_view(&self, lease: Option<&Lease>, maps: &[ConfigMap], pods: &[Pod]) -> ClusterView {
        let scope = &self.settings.scope;
        let find = |m: StateMap| {
            let name = m.name(scope);
            maps.iter()
                .find(|c| c.metadata.name.as_deref() == Some(name.as_str()))
        };
        let versioned = |m: StateMap| {
            let map = find(m);
            (map, map.and_then(state::revision_of).unwrap_or(0))
        };
        let mut view = ClusterView {
            revision: lease
                .and_then(|l| l.metadata.resource_version.as_deref())
                .and_then(parse_resource_version)
                .unwrap_or(0),
            ..Default::default()
        };
        view.leader = match self.lease_state() {
            LeaseState::Held {
                holder,
                resource_version,
            } => Some(LeaderKey {
                name: holder,
                revision: parse_resource_version(&resource_version).unwrap_or(0),
                lease: 0,
            }),
            _ => None,
        };
        let (config_map, config_rev) = versioned(StateMap::Config);
        view.initialize = config_map
            .and_then(|m| m.metadata.annotations.as_ref())
            .and_then(|a| a.get("initialize"))
            .map(|value| Versioned {
                value: value.clone(),
                revision: config_rev,
            });
        view.config = state::annotation_of(config_map, "config")
            .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
            .filter(|v| v.is_object())
            .map(|value| Versioned {
                value,
                revision: config_rev,
            });
        view.history = state::annotation_of(config_map, "history")
            .map(HistoryLine::parse_all)
            .unwrap_or_default();
        let (failover_map, failover_rev) = versioned(StateMap::Failover);
        view.failover = state::annotation_of(failover_map, "failover")
            .and_then(FailoverRequest::parse)
            .map(|value| Versioned {
                value,
                revision: failover_rev,
            });
        let (sync_map, sync_rev) = versioned(StateMap::Sync);
        view.sync = state::annotation_of(sync_map, "sync")
            .and_then(SyncState::parse)
            .map(|value| Versioned {
                value,
                revision: sync_rev,
            });
        view.status =
            state::annotation_of(find(StateMap::Status), "status").and_then(LeaderStatus::parse);
        view.failsafe = state::annotation_of(find(StateMap::Status), crate::dcs::FAILSAFE_KEY)
            .and_then(crate::dcs::model::parse_failsafe);
        view.members = pods.iter().filter_map(members::member_of).collect();
        view.members.sort_by(|a, b| a.name.cmp(&b.name));
        view
    }
}

#[async_trait]
impl Dcs for KubeDcs {
    async fn cluster(&self) -> Result<ClusterView, DcsError> {
        let selector = members::label_selector(&self.settings.selector_labels());
        let lp = ListParams::default().labels(&selector);
        let (lease, maps, pods) = tokio::join!(
            self.call(
                "read the leader lease",
                self.leases.get_opt(&self.settings.lease_name)
            ),
            self.call("list the state ConfigMaps", self.configmaps.list(&lp)),
            self.call("list the member Pods", self.pods.list(&lp)),
        );
        let lease = lease?;
        let maps = maps?;
        let pods = pods?;
        self.observe_lease(lease.as_ref());
        if self.holds_lease() {
            self.unlabel_former_leaders(Some(&pods.items));
        }
        // Someone else may have changed our Pod: rewrite the mark on the next touch.
        if let Some(own) = pods
            .items
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(self.settings.name.as_str()))
        {
            let seen = members::mark_of(own, &self.settings.role.key);
            let mut mark = self.own_mark.lock().await;
            if mark.as_ref() != Some(&seen) {
                *mark = None;
            }
        }
        Ok(self.build_view(lease.as_ref(), &maps.items, &pods.items))
    }

    async fn race_initialize(&self, value: &str) -> Result<bool, DcsError> {
        self.write_state(
            "race for initialize",
            StateMap::Config,
            &[("initialize", Some(value.to_owned()))],
            "initialize",
            Expect::Absent,
        )
        .await
    }

    async fn set_initialize(&self, sysid: &str) -> Result<(), DcsError> {
        self.write_state(
            "set initialize",
            StateMap::Config,
            &[("initialize", Some(sysid.to_owned()))],
            "initialize",
            Expect::Any,
        )
        .await
        .map(drop)
    }

    async fn cancel_initialize(&self, expected_revision: Option<i64>) -> Result<bool, DcsError> {
        self.write_state(
            "delete initialize",
            StateMap::Config,
            &[("initialize", None)],
            "initialize",
            expected_revision.map_or(Expect::Any, Expect::Revision),
        )
        .await
    }

    async fn write_config(
        &self,
        config: &serde_json::Value,
        expected_revision: Option<i64>,
    ) -> Result<bool, DcsError> {
        self.write_state(
            "write config",
            StateMap::Config,
            &[("config", Some(config.to_string()))],
            "config",
            Expect::from_revision(expected_revision),
        )
        .await
    }

    async fn acquire_leader(&self) -> Result<bool, DcsError> {
        let _writes = self.lease_writes.lock().await;
        let state = match self.lease_state() {
            LeaseState::Unknown => {
                self.get_lease().await?;
                self.lease_state()
            }
            known => known,
        };
        match state {
            LeaseState::Absent => {
                let lease = self.held_lease(None, true);
                self.expect_holding();
                match self
                    .call(
                        "create the leader lease",
                        self.leases.create(&PostParams::default(), &lease),
                    )
                    .await
                {
                    Ok(written) => {
                        self.observe_lease(Some(&written));
                        self.unlabel_former_leaders(None);
                        Ok(true)
                    }
                    // Another member created it first.
                    Err(Failure::Conflict) => Ok(false),
                    Err(f) => Err(f.into()),
                }
            }
            LeaseState::Free { .. } | LeaseState::Expired { .. } => {
                let current = self.tracker.lock().ok().and_then(|t| t.record().cloned());
                let Some(current) = current else {
                    return Ok(false);
                };
                let base = self.lease_base(&current);
                let lease = self.held_lease(Some(&base), true);
                self.expect_holding();
                // 409: the holder renewed, or another member took it first.
                let won = self
                    .replace_lease("take over the leader lease", &lease)
                    .await?
                    .is_some();
                if won {
                    self.unlabel_former_leaders(None);
                }
                Ok(won)
            }
            LeaseState::Held { holder, .. } if holder == self.settings.name => Ok(true),
            LeaseState::Held { .. } | LeaseState::Unknown => Ok(false),
        }
    }

    async fn renew_leader(&self) -> Result<LeaseRenewal, DcsError> {
        let _writes = self.lease_writes.lock().await;
        let mut current = match self.lease_record() {
            Some(r) => r,
            None => {
                self.read_lease()
                    .await
                    .map_err(|f| DcsError::from(f.unconfirmed_if_forbidden()))?;
                self.lease_record().ok_or_else(|| {
                    DcsError::rejected(format!(
                        "the leader Lease {} does not exist",
                        self.settings.lease_name
                    ))
                })?
            }
        };
        // One retry after a 409, and only after re-reading shows the Lease still names us
        // (our own earlier write whose answer was lost, or an edit by someone else).
        for attempt in 0..2 {
            if current.holder.as_deref() != Some(self.settings.name.as_str()) {
                return Err(DcsError::rejected(format!(
                    "the leader Lease is held by {}",
                    current.holder.as_deref().unwrap_or("nobody")
                )));
            }
            let base = self.lease_base(&current);
            let lease = self.held_lease(Some(&base), false);
            self.expect_holding();
            let ttl = self.ttl();
            // Taken before the request: the server stores the renewal, and others can see it,
            // only after this instant (see `lease`).
            let sent_at = Instant::now();
            if self
                .try_replace_lease("renew the leader lease", &lease)
                .await
                .map_err(|f| DcsError::from(f.unconfirmed_if_forbidden()))?
                .is_some()
            {
                return Ok(LeaseRenewal { sent_at, ttl });
            }
            if attempt == 0 {
                debug!("renewal got 409 Conflict; re-reading the leader lease");
                self.read_lease()
                    .await
                    .map_err(|f| DcsError::from(f.unconfirmed_if_forbidden()))?;
                match self.lease_record() {
                    Some(r) => current = r,
                    None => break,
                }
            }
        }
        Err(DcsError::rejected(
            "the leader Lease changed under us; it is no longer certain to be ours",
        ))
    }

    async fn release_leader(&self) -> Result<(), DcsError> {
        let _writes = self.lease_writes.lock().await;
        for _ in 0..2 {
            let Some(mut lease) = self.get_lease().await? else {
                return Ok(());
            };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.settings.name.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            if self
                .replace_lease("release the leader lease", &lease)
                .await?
                .is_some()
            {
                return Ok(());
            }
        }
        Err(DcsError::rejected(
            "the leader Lease kept changing while releasing it",
        ))
    }

    fn release_token(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.release_token.subscribe()
    }

    fn on_release_token(&self, sink: super::ReleaseTokenSink) {
        self.release_token.set_sink(sink);
    }

    async fn release_dead_leader(&self, token: &str) -> Result<bool, DcsError> {
        let incarnation = token.strip_prefix(KUBE_TOKEN_PREFIX).ok_or_else(|| {
            DcsError::rejected(format!("not a Kubernetes release token: {token:?}"))
        })?;
        let _writes = self.lease_writes.lock().await;
        let Some(mut lease) = self.get_lease().await? else {
            return Ok(false);
        };
        // Only the Lease as the dead agent wrote it: naming us, written by that very process.
        // Any later holder (a restarted agent, which waits for the guard to finish before it
        // writes, or another member that took over) means it is not ours to release.
        if holder_of(&lease) != Some(self.settings.name.as_str())
            || incarnation_of(&lease) != Some(incarnation)
        {
            return Ok(false);
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
        }
        // The replace carries the version just read: 409 if anything wrote the Lease since.
        Ok(self
            .replace_lease("release the dead leader's lease", &lease)
            .await?
            .is_some())
    }

    async fn touch_member(&self, record: &MemberRecord) -> Result<(), DcsError> {
        let mark: PodMark = (
            Some(record.encode()),
            Some(self.settings.role.value_for(&record.role).to_owned()),
        );
        let mut written = self.own_mark.lock().await;
        if written.as_ref() == Some(&mark) {
            return Ok(());
        }
        let patch = members::mark_patch(&self.settings.role.key, &mark);
        match self
            .call(
                "write the member record",
                self.pods.patch(
                    &self.settings.name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                ),
            )
            .await
        {
            Ok(_) => {
                if written.as_ref().map(|m| &m.1) != Some(&mark.1) {
                    info!(label = %self.settings.role.key, value = ?mark.1, "labelled our Pod with its role");
                }
                *written = Some(mark);
                Ok(())
            }
            Err(Failure::NotFound) => Err(DcsError::rejected(format!(
                "our Pod {}/{} does not exist (the member name must be the Pod's name)",
                self.namespace, self.settings.name
            ))),
            Err(f) => {
                *written = None;
                Err(f.into())
            }
        }
    }

    async fn write_status(&self, status: &LeaderStatus) -> Result<(), DcsError> {
        let value = serde_json::to_string(status)
            .map_err(|e| DcsError::rejected(format!("cannot encode status: {e}")))?;
        self.write_state(
            "write status",
            StateMap::Status,
            &[("status", Some(value))],
            "status",
            Expect::Any,
        )
        .await
        .map(drop)
    }

    async fn write_history(&self, history: &[HistoryLine]) -> Result<(), DcsError> {
        self.write_state(
            "write history",
            StateMap::Config,
            &[("history", Some(HistoryLine::encode_all(history)))],
            "history",
            Expect::Any,
        )
        .await
        .map(drop)
    }

    async fn write_failover(
        &self,
        request: &FailoverRequest,
        expected_revision: Option<i64>,
    ) -> Result<bool, DcsError> {
        let value = serde_json::to_string(request)
            .map_err(|e| DcsError::rejected(format!("cannot encode failover: {e}")))?;
        self.write_state(
            "write failover",
            StateMap::Failover,
            &[("failover", Some(value))],
            "failover",
            Expect::from_revision(expected_revision),
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
        self.write_state(
            "write sync",
            StateMap::Sync,
            &[("sync", value)],
            "sync",
            Expect::from_revision(expected_revision),
        )
        .await
    }

    /// There is no lease to revoke: a clean stop removes our member record and role label at
    /// once instead (the leader Lease was released before, when it was ours).
    async fn revoke_lease(&self) -> Result<(), DcsError> {
        let mut written = self.own_mark.lock().await;
        let patch = members::mark_patch(&self.settings.role.key, &(None, None));
        let result = self
            .call(
                "remove the member record",
                self.pods.patch(
                    &self.settings.name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                ),
            )
            .await;
        *written = None;
        match result {
            Ok(_) | Err(Failure::NotFound) => Ok(()),
            Err(f) => Err(f.into()),
        }
    }

    /// The lock is an annotation of `<scope>-status` that counts only while its taker holds
    /// the same term of the leader Lease ([`state::live_lease_key`]); only the Lease holder
    /// takes it. Compare-and-set on the ConfigMap's `resourceVersion`.
    async fn acquire_lease_key(&self, key: &str, value: &str) -> Result<bool, DcsError> {
        let op = "acquire lease key";
        let Some(lease) = self.lease_record().filter(|_| self.holds_lease()) else {
            return Ok(false);
        };
        let name = StateMap::Status.name(&self.settings.scope);
        let current = self.call(op, self.configmaps.get_opt(&name)).await?;
        let held = state::annotation_of(current.as_ref(), key)
            .and_then(|raw| state::live_lease_key(raw, Some(&lease)))
            .is_some_and(|live| live.is_some());
        if held {
            return Ok(false);
        }
        let expect = match current.as_ref().and_then(state::revision_of) {
            Some(rev) => Expect::Revision(rev),
            None => Expect::Absent,
        };
        let record = state::lease_key_record(value, &self.settings.name, &lease);
        self.write_state(op, StateMap::Status, &[(key, Some(record))], key, expect)
            .await
    }

    async fn release_lease_key(&self, key: &str, value: &str) -> Result<(), DcsError> {
        let op = "release lease key";
        let name = StateMap::Status.name(&self.settings.scope);
        let current = self.call(op, self.configmaps.get_opt(&name)).await?;
        let ours = state::annotation_of(current.as_ref(), key)
            .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw).ok())
            .is_some_and(|v| v["value"].as_str() == Some(value));
        let Some(rev) = current.as_ref().and_then(state::revision_of) else {
            return Ok(());
        };
        if ours {
            self.write_state(
                op,
                StateMap::Status,
                &[(key, None)],
                key,
                Expect::Revision(rev),
            )
            .await?;
        }
        Ok(())
    }

    async fn read_key(&self, key: &str) -> Result<Option<String>, DcsError> {
        let name = StateMap::Status.name(&self.settings.scope);
        let current = self
            .call("read key", self.configmaps.get_opt(&name))
            .await?;
        let lease = self.lease_record();
        Ok(
            state::annotation_of(current.as_ref(), key).and_then(
                |raw| match state::live_lease_key(raw, lease.as_ref()) {
                    Some(live) => live,
                    None => Some(raw.to_owned()),
                },
            ),
        )
    }

    async fn write_key(&self, key: &str, value: &str) -> Result<(), DcsError> {
        self.write_state(
            "write key",
            StateMap::Status,
            &[(key, Some(value.to_owned()))],
            key,
            Expect::Any,
        )
        .await
        .map(drop)
    }

    async fn wait_for_change(&self, timeout: Duration) -> Wakeup {
        let now = Instant::now();
        let mut deadline = tokio::time::Instant::now() + timeout;
        // A Lease expires without any event: wake up when another holder's term runs out.
        let expiry = self
            .tracker
            .lock()
            .ok()
            .and_then(|t| t.next_expiry(&self.settings.name, now));
        let mut woken_by_expiry = false;
        if let Some(at) = expiry {
            let at = tokio::time::Instant::from_std(at);
            if at < deadline {
                deadline = at;
                woken_by_expiry = true;
            }
        }
        match self.wake.wait(deadline).await {
            Wakeup::Timeout if woken_by_expiry => Wakeup::LeaderChanged,
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_and_server_errors_are_transient_refusals_are_not() {
        let api = |code: u16| {
            kube::Error::Api(kube::error::ErrorResponse {
                status: "Failure".into(),
                message: "m".into(),
                reason: "r".into(),
                code,
            })
        };
        assert!(classify(api(503)).is_transient());
        assert!(classify(api(429)).is_transient());
        assert!(!classify(api(403)).is_transient());
        assert!(!classify(api(422)).is_transient());
    }

    #[test]
    fn a_lease_record_keeps_what_expiry_is_judged_by() {
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pg-leader", "resourceVersion": "17"},
            "spec": {"holderIdentity": "pg-1", "leaseDurationSeconds": 10,
                     "renewTime": "2024-01-01T00:00:00.123456Z", "leaseTransitions": 2}
        }))
        .expect("lease");
        let r = record_of(&lease);
        assert_eq!(r.holder.as_deref(), Some("pg-1"));
        assert_eq!(r.duration, Duration::from_secs(10));
        assert_eq!(r.transitions, 2);
        assert_eq!(r.resource_version, "17");
        assert_eq!(r.renew_time.as_deref(), Some("2024-01-01T00:00:00.123456Z"));
    }
}
