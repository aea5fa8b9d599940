//! The reconciler: makes a cluster's objects match its `PostgresCluster`, reports status and
//! drives rollouts. Everything here is idempotent: a reconcile may run at any time, any number
//! of times, from any controller replica that holds the controller Lease.
//!
//! What it never does: decide a failover, touch the leader Lease, or restart or remove a primary
//! while a replica could take over first (a departing leader hands over before a scale-down).
//! A stopped controller leaves a running cluster running.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::agent_api::{self, ApiCredentials};
use crate::crd::{PostgresCluster, PostgresClusterStatus, PvcRetention, SpecError};
use crate::dcs_config;
use crate::manual_backup::{self, Need};
use crate::render::{self, Names, FIELD_MANAGER, SCOPE_LABEL};
use crate::rollout::{self, Step};
use crate::scale_down;
use crate::status::{self, member_of, PodView, StatusInput, MEMBER_ANNOTATION};
use crate::unchanged;
use crate::upgrade;

/// Finalizer present only while `spec.pvcRetention: Delete`: the PVCs are nobody's children,
/// so deleting them needs the controller. With the default `Retain` no finalizer is set, and
/// deleting a cluster never waits for the controller.
pub const PVC_FINALIZER: &str = "pgwarden.io/delete-pvcs";

/// How long a switchover request may take (the agent answers when the new leader took over).
const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `POST /backup`, `GET /backups` and `GET /patroni` may take (the agent answers at
/// once).
const BACKUP_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Failures of one reconcile. Each is retried with exponential backoff by [`error_policy`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API server request failed (transient, or a permission the controller lacks).
    #[error("{action} failed")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    /// The switchover the rollout or a scale-down asked for was refused or failed; the next
    /// reconcile re-plans from what the agents then publish.
    #[error("switchover from {primary} to {candidate} failed")]
    Switchover {
        primary: String,
        candidate: String,
        #[source]
        source: agent_api::AgentApiError,
    },
    /// The primary published no `api_url`, so the switchover cannot be requested.
    #[error("member {0} published no REST API address")]
    NoApiUrl(String),
    /// Creating `spec.users`/`spec.databases` on the primary failed.
    #[error("creating users and databases on the primary failed")]
    Sql(#[source] crate::sql::SqlError),
    /// Creating the pooler's role or its `auth_query` function on the primary failed.
    #[error("creating the pooler's role and auth function on the primary failed")]
    Pooler(#[source] crate::sql::SqlError),
}

impl Error {
    /// Short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::Switchover { .. } => "switchover",
            Error::NoApiUrl(_) => "no_api_url",
            Error::Sql(_) => "sql",
            Error::Pooler(_) => "pooler_sql",
        }
    }
}

pub(crate) fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

/// Shared state of the reconcilers.
pub struct Context {
    pub client: Client,
    /// Consecutive failures per cluster, for the exponential requeue.
    failures: Mutex<HashMap<ObjectRef<PostgresCluster>, u32>>,
    /// Per cluster, the (generation, primary) for which users and databases were last
    /// ensured: the agents change their Pods every few seconds, and each change wakes a
    /// reconcile that need not connect to postgres again.
    ensured: Mutex<HashMap<ObjectRef<PostgresCluster>, Ensured>>,
    /// Per cluster, the last on-demand backup id this process had the agent accept: a
    /// reconcile woken before the watch delivered the new `status.manualBackup` must not ask
    /// for the same id again.
    backups_started: Mutex<HashMap<ObjectRef<PostgresCluster>, String>>,
    /// Per StatefulSet (`namespace/name`), the `metadata.generation` our last apply left: a
    /// different one means somebody else changed its spec, so the next apply is not skipped
    /// ([`crate::unchanged`]).
    applied_generations: Mutex<HashMap<String, i64>>,
    /// Bounds the reconciles running at once: at a few hundred clusters an unbounded first
    /// wave had the apiserver answer 429 and every reconcile back off. Each reconcile sends its
    /// requests one after another, so this is also the bound on our requests in flight.
    running: tokio::sync::Semaphore,
    /// Per cluster, the (generation, primary) for which the pooler's role and function were
    /// last ensured ([`crate::pooler`]).
    pub(crate) pooler_ensured: Mutex<HashMap<ObjectRef<PostgresCluster>, Ensured>>,
    /// Per cluster, the generation whose unwanted pooler objects were deleted.
    pub(crate) pooler_cleaned: Mutex<HashMap<ObjectRef<PostgresCluster>, i64>>,
}

/// How many clusters are reconciled at once.
const CONCURRENT_RECONCILES: usize = 8;

/// The `metadata.generation` and the primary that users and databases were ensured for.
type Ensured = (Option<i64>, String);

impl Context {
    pub fn new(client: Client) -> Arc<Context> {
        Arc::new(Context {
            client,
            failures: Mutex::new(HashMap::new()),
            ensured: Mutex::new(HashMap::new()),
            backups_started: Mutex::new(HashMap::new()),
            applied_generations: Mutex::new(HashMap::new()),
            running: tokio::sync::Semaphore::new(CONCURRENT_RECONCILES),
            pooler_ensured: Mutex::new(HashMap::new()),
            pooler_cleaned: Mutex::new(HashMap::new()),
        })
    }

    fn record_failure(&self, key: ObjectRef<PostgresCluster>) -> u32 {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    fn record_success(&self, key: &ObjectRef<PostgresCluster>) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

/// Runs the controller until SIGTERM/SIGINT: watches `PostgresCluster`s (in `namespace`, or
/// all namespaces), the objects they own, and member Pods (whose annotations and role labels
/// the agents change).
pub async fn run(client: Client, namespace: Option<String>) {
    let (clusters, statefulsets, pods): (Api<PostgresCluster>, Api<StatefulSet>, Api<Pod>) =
        match &namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };
    let member_pods = watcher::Config::default().labels(&format!(
        "{}={}",
        render::APPLICATION_LABEL,
        render::APPLICATION
    ));
    let ctx = Context::new(client);
    Controller::new(clusters, watcher::Config::default())
        .owns(statefulsets, watcher::Config::default())
        .watches(pods, member_pods, |pod: Pod| {
            let cluster = pod.labels().get(SCOPE_LABEL).cloned();
            let namespace = pod.namespace();
            cluster.map(|c| ObjectRef::new(&c).within(namespace.as_deref().unwrap_or("default")))
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(cluster = %obj, "reconciled"),
                Err(err) => debug!(error = %err, "reconcile did not complete"),
            }
        })
        .await;
}

/// Exponential requeue: 2 s, 4 s, ... capped at 5 minutes, per cluster.
pub fn error_policy(pg: Arc<PostgresCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.record_failure(ObjectRef::from_obj(pg.as_ref()));
    let delay = backoff(failures);
    warn!(cluster = %pg.name_any(), kind = error.kind(), error = %ErrorChain(error), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The delay before retry number `failures` (1-based).
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(8);
    Duration::from_secs((2u64 << exp).min(300))
}

/// Displays an error with its sources, once each.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// One reconcile of one cluster.
pub async fn reconcile(pg: Arc<PostgresCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = ObjectRef::from_obj(pg.as_ref());
    // Never closed, so acquiring only waits.
    let _permit = ctx.running.acquire().await.ok();
    let result = reconcile_inner(&pg, &ctx).await;
    if result.is_ok() {
        ctx.record_success(&key);
    }
    result
}

async fn reconcile_inner(pg: &PostgresCluster, ctx: &Context) -> Result<Action, Error> {
    let names = Names::of(pg);
    let client = ctx.client.clone();
    let clusters: Api<PostgresCluster> = Api::namespaced(client.clone(), &names.namespace);

    if pg.meta().deletion_timestamp.is_some() {
        return cleanup(pg, ctx).await;
    }
    sync_finalizer(pg, &clusters).await?;

    let mut spec_errors = match pg.spec.validate() {
        Ok(()) => Vec::new(),
        Err(errors) => errors,
    };
    // Observed before anything is applied: the StatefulSet's member count depends on who
    // leads (a departing leader hands over before its Pod is removed).
    let observed = observe(pg, &client).await?;
    let desired = pg.spec.instances.replicas;
    let upgrade = plan_upgrade(pg, &observed).await?;
    if let upgrade::Plan::Refused(e) = &upgrade {
        spec_errors.push(e.clone());
    }
    let rendering = upgrade.rendering(pg.spec.postgres_version);
    // The builders render the version (and upgrade) of this step, not always the spec's.
    let rendered = rendering.apply_to(pg);
    let scale = if spec_errors.is_empty() && !upgrade.in_progress() {
        scale_down::plan(
            desired,
            observed.statefulset_replicas,
            &observed.pods,
            observed.lease_holder.as_deref(),
            observed.paused,
        )
    } else {
        scale_down::Plan::Proceed
    };
    let replicas = match rendering.replicas {
        Some(n) => n,
        // Pending: the member count waits with the rest.
        None if upgrade.in_progress() => observed.statefulset_replicas.unwrap_or(desired),
        None => scale.replicas(desired),
    };
    if spec_errors.is_empty() {
        apply_children(&rendered, ctx, replicas).await?;
    } else {
        // Nothing is changed on the strength of an invalid spec; the running cluster stays
        // as it is and the condition says why.
        warn!(cluster = %names.cluster, errors = %spec_errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "), "invalid spec");
    }

    if spec_errors.is_empty() {
        sync_dcs_parameters(pg, &client).await?;
    }
    let step = if !spec_errors.is_empty() {
        Step::UpToDate
    } else if let Some(note) = upgrade.note() {
        // The upgrade stops and starts the members itself.
        Step::Wait(note.message)
    } else if scale != scale_down::Plan::Proceed {
        // One thing at a time: restarting a member now could take away the candidate, and a
        // rollout's switchover could pick a departing member.
        Step::Wait("the scale-down goes first".to_owned())
    } else {
        // Departing members are not the rollout's: restarting one is wasted, and a
        // switchover to one would be followed by a failover when its Pod goes.
        let staying: Vec<PodView> = observed
            .pods
            .iter()
            .filter(|p| scale_down::stays(&p.name, replicas))
            .cloned()
            .collect();
        rollout::next_step(&staying, observed.lease_holder.as_deref())
    };
    let rollout_note = match &step {
        Step::UpToDate => None,
        other => Some(other.to_string()),
    };
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let previous_upgrade = pg.status.as_ref().and_then(|s| s.upgrade.as_ref());
    let upgrade_status = upgrade.status(previous_upgrade, pg.spec.postgres_version, &now);
    if let Some(u) = upgrade_status.as_ref().filter(|u| {
        previous_upgrade.map(|p| (&p.phase, &p.message)) != Some((&u.phase, &u.message))
    }) {
        info!(cluster = %names.cluster, from = u.from, to = u.to, phase = %u.phase, "upgrade: {}", u.message);
    }
    write_status(
        pg,
        &clusters,
        &observed,
        &spec_errors,
        rollout_note,
        upgrade.note().or_else(|| scale.note()),
        upgrade_status,
    )
    .await?;
    match &upgrade {
        upgrade::Plan::Stopping {
            switchover: Some((primary, candidate)),
            ..
        } => {
            info!(cluster = %names.cluster, "upgrade: switching over from {primary} to {candidate}");
            switchover(&client, &names, &observed, primary, candidate).await?;
        }
        upgrade::Plan::Starting {
            restart: Some(pod), ..
        } => {
            info!(cluster = %names.cluster, %pod, "upgrade: restarting a member that is not ready on an older template");
            delete_pod(&client, &names, &observed, pod).await?;
        }
        _ => {}
    }
    match &scale {
        scale_down::Plan::Proceed => {}
        scale_down::Plan::Switchover {
            primary, candidate, ..
        } => {
            info!(cluster = %names.cluster, "scale-down: {scale}");
            switchover(&client, &names, &observed, primary, candidate).await?;
        }
        // Repeated every few seconds while it lasts; the status carries it for people.
        scale_down::Plan::Hold { .. } => {
            debug!(cluster = %names.cluster, "scale-down: {scale}");
        }
    }
    execute_step(pg, &client, &observed, &step).await?;
    if spec_errors.is_empty() && pg.spec.pvc_retention == PvcRetention::Delete {
        delete_departed_pvcs(pg, &client, &observed, replicas).await?;
    }
    if spec_errors.is_empty() {
        ensure_users_and_databases(pg, ctx, &observed).await?;
        ensure_pooler_role(pg, ctx, &observed).await?;
    }
    let backup_pending =
        spec_errors.is_empty() && sync_manual_backup(pg, ctx, &clusters, &observed).await?;

    Ok(match step {
        // An on-demand backup is being asked for or followed.
        _ if backup_pending => Action::requeue(Duration::from_secs(5)),
        // Waiting for a backup (or a resume) is for people: no need to look often.
        _ if matches!(upgrade, upgrade::Plan::Pending { .. }) => {
            Action::requeue(Duration::from_secs(30))
        }
        Step::UpToDate if observed.all_ready(desired) => Action::requeue(Duration::from_secs(300)),
        // Members starting, a rollout under way: look again soon (Pod events also wake us).
        _ => Action::requeue(Duration::from_secs(5)),
    })
}

/// The major-version step of this reconcile ([`upgrade::plan`]), with what it needs gathered:
/// the leader's backups before the upgrade commits, the members' server versions while they
/// start on the new one.
async fn plan_upgrade(pg: &PostgresCluster, observed: &Observed) -> Result<upgrade::Plan, Error> {
    let names = Names::of(pg);
    let target = pg.spec.postgres_version;
    let previous = pg.status.as_ref().and_then(|s| s.upgrade.as_ref());
    let api_url = |pod: &str| {
        observed
            .pods
            .iter()
            .find(|p| p.name == pod)
            .and_then(|p| p.member.as_ref())
            .map(|m| m.api_url.clone())
            .filter(|u| !u.is_empty())
    };
    let backup = if pg.spec.backups.is_none() {
        upgrade::BackupCheck::NotConfigured
    } else if !upgrade::needs_backup_check(target, observed.template) {
        upgrade::BackupCheck::NotAsked
    } else {
        match observed.lease_holder.as_deref().and_then(api_url) {
            None => upgrade::BackupCheck::Missing("the leader's backups cannot be read".to_owned()),
            Some(url) => match agent_api::backups(&url, BACKUP_CALL_TIMEOUT).await {
                Ok(body) => match serde_json::from_str(&body) {
                    Ok(info) => upgrade::backup_check(&info, chrono::Utc::now().timestamp()),
                    Err(e) => upgrade::BackupCheck::Missing(format!(
                        "the leader's `GET /backups` is not JSON ({e})"
                    )),
                },
                Err(e) => upgrade::BackupCheck::Missing(format!(
                    "the leader's backups cannot be read ({e})"
                )),
            },
        }
    };
    let mut server_majors = std::collections::BTreeMap::new();
    if upgrade::needs_versions(target, observed.template, previous) {
        for pod in &observed.pods {
            let Some(url) = api_url(&pod.name) else {
                continue;
            };
            match agent_api::patroni(&url, BACKUP_CALL_TIMEOUT).await {
                Ok(body) => {
                    let version = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["server_version"].as_u64());
                    if let Some(major) = version.and_then(|v| u32::try_from(v / 10_000).ok()) {
                        server_majors.insert(pod.name.clone(), major);
                    }
                }
                Err(e) => {
                    debug!(cluster = %names.cluster, pod = %pod.name, error = %e, "cannot read the member's server version")
                }
            }
        }
    }
    Ok(upgrade::plan(&upgrade::Input {
        target,
        template: observed.template,
        desired: pg.spec.instances.replicas,
        current_replicas: observed.statefulset_replicas,
        pods: &observed.pods,
        leader: observed.lease_holder.as_deref(),
        paused: observed.paused,
        backup,
        server_majors: &server_majors,
        previous,
    }))
}

/// Server-side apply of every child object, and creation of missing Secrets. The StatefulSet
/// gets `replicas` members: the spec's, unless a scale-down waits ([`scale_down`]).
async fn apply_children(pg: &PostgresCluster, ctx: &Context, replicas: i32) -> Result<(), Error> {
    let client = &ctx.client;
    let names = Names::of(pg);
    let ns = names.namespace.as_str();

    for secret in render::secrets::secrets(pg, render::secrets::generate_password) {
        create_if_missing(client, ns, &secret).await?;
    }
    apply(client, ns, &render::rbac::service_account(pg)).await?;
    apply(client, ns, &render::rbac::role(pg)).await?;
    apply(client, ns, &render::rbac::role_binding(pg)).await?;
    let cm = render::configmap::configmap(pg);
    let hash = render::configmap::config_hash(pg);
    apply(client, ns, &cm).await?;
    apply(client, ns, &render::services::headless(pg)).await?;
    apply(client, ns, &render::services::primary(pg)).await?;
    apply(client, ns, &render::services::replicas(pg)).await?;
    apply(client, ns, &render::pdb::pdb(pg)).await?;
    let mut statefulset = render::statefulset::statefulset(pg, &hash);
    if let Some(spec) = statefulset.spec.as_mut() {
        spec.replicas = Some(replicas);
    }
    apply_statefulset(ctx, ns, &statefulset).await?;
    crate::pooler::sync_objects(pg, ctx).await?;
    Ok(())
}

/// [`apply`] of the StatefulSet, left out when it would change nothing ([`crate::unchanged`]):
/// on a 1.20 apiserver even an unchanged apply writes a new version, which our watch of the
/// StatefulSet turns into the next reconcile.
async fn apply_statefulset(
    ctx: &Context,
    ns: &str,
    statefulset: &StatefulSet,
) -> Result<(), Error> {
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let name = statefulset.name_any();
    let key = format!("{ns}/{name}");
    let mut body = statefulset.clone();
    body.meta_mut().managed_fields = None;
    let Ok(desired) = serde_json::to_value(&body) else {
        return apply(&ctx.client, ns, statefulset).await;
    };
    let desired = unchanged::with_applied_hash(desired);
    let live = api
        .get_opt(&name)
        .await
        .map_err(kube_err(format!("reading the StatefulSet {name}")))?;
    let ours = ctx
        .applied_generations
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .copied();
    if let Some(live) = &live {
        let difference = match serde_json::to_value(live) {
            Ok(live) => unchanged::first_difference(&desired, &live),
            Err(_) => Some(String::new()),
        };
        let untouched = ours.is_some() && live.metadata.generation == ours;
        match difference {
            None if untouched => {
                debug!(statefulset = %key, "unchanged, not applied");
                return Ok(());
            }
            None => debug!(statefulset = %key, "applied: its generation is not our last apply's"),
            Some(path) => debug!(statefulset = %key, path = %path, "applied: it differs"),
        }
    }
    let applied = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await
        .map_err(kube_err(format!("applying StatefulSet {name}")))?;
    let mut generations = ctx
        .applied_generations
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    match applied.metadata.generation {
        Some(generation) => generations.insert(key, generation),
        None => generations.remove(&key),
    };
    Ok(())
}

/// Writes the spec's parameters and `spec.standby` into the agents' DCS `config`
/// (`crate::dcs_config`), compare and set on the ConfigMap's `resourceVersion`: a concurrent
/// write by an agent (a 409) is retried by the next reconcile.
async fn sync_dcs_parameters(pg: &PostgresCluster, client: &Client) -> Result<(), Error> {
    let names = Names::of(pg);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &names.namespace);
    let name = dcs_config::configmap_name(&names.cluster);
    let Some(map) = maps
        .get_opt(&name)
        .await
        .map_err(kube_err(format!("reading the ConfigMap {name}")))?
    else {
        return Ok(());
    };
    let wanted = dcs_config::Wanted {
        parameters: pg
            .spec
            .postgresql
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.to_yaml()))
            .collect(),
        standby_cluster: render::agent_config::standby_cluster(&pg.spec),
    };
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let Some(annotations) = dcs_config::update(&map, &wanted, &now) else {
        return Ok(());
    };
    let changed = annotations.contains_key(dcs_config::CONFIG_ANNOTATION);
    let patch = serde_json::json!({"metadata": {
        "resourceVersion": map.resource_version(),
        "annotations": annotations,
    }});
    match maps
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            if changed {
                info!(cluster = %names.cluster, "wrote the spec's parameters and standby source into the DCS config; the members apply them");
            }
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(kube_err(format!("writing the DCS config in {name}"))(e)),
    }
}

/// Server-side apply with our field manager. `force`: fields another manager took over (a
/// `kubectl edit` of a Service selector) are taken back, since the spec is the truth.
pub(crate) async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.name_any();
    let mut obj = obj.clone();
    // Apply bodies must carry apiVersion and kind; k8s-openapi's Serialize writes them.
    obj.meta_mut().managed_fields = None;
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await
    .map_err(kube_err(format!("applying {} {name}", K::kind(&()))))?;
    Ok(())
}

/// Creates `obj` unless an object of that name exists; an existing one is left exactly as it
/// is (used for Secrets: a password is never replaced).
pub(crate) async fn create_if_missing<K>(client: &Client, ns: &str, obj: &K) -> Result<bool, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.name_any();
    let what = || format!("creating {} {name}", K::kind(&()));
    if api
        .get_opt(&name)
        .await
        .map_err(kube_err(what()))?
        .is_some()
    {
        return Ok(false);
    }
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => {
            info!(kind = %K::kind(&()), name = %name, "created");
            Ok(true)
        }
        // Someone (another controller replica) created it between our read and write.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(kube_err(what())(e)),
    }
}

/// What the agents and the StatefulSet controller currently show.
struct Observed {
    pods: Vec<PodView>,
    /// The Pods themselves, by name (for uids and member records).
    raw: HashMap<String, Pod>,
    lease_holder: Option<String>,
    /// The StatefulSet's `spec.replicas`; `None` before it exists.
    statefulset_replicas: Option<i32>,
    /// The agents' `config.pause`, or a member publishing `pause`.
    paused: bool,
    /// The StatefulSet's version annotations ([`upgrade::template_of`]).
    template: Option<upgrade::Template>,
}

impl Observed {
    fn all_ready(&self, desired: i32) -> bool {
        let ready = self.pods.iter().filter(|p| p.ready).count();
        usize::try_from(desired).is_ok_and(|d| ready == d && self.pods.len() == d)
    }
}

async fn observe(pg: &PostgresCluster, client: &Client) -> Result<Observed, Error> {
    let names = Names::of(pg);
    let ns = names.namespace.as_str();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = render::selector_labels(&names)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods = pods_api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_err("listing member pods"))?;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let statefulset = sts
        .get_opt(&names.statefulset())
        .await
        .map_err(kube_err("reading the statefulset"))?;
    let statefulset_replicas = statefulset
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas);
    let template = statefulset
        .as_ref()
        .and_then(|s| upgrade::template_of(s.annotations()));
    let update_revision = statefulset
        .and_then(|s| s.status)
        .and_then(|s| s.update_revision);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let dcs_map = maps
        .get_opt(&dcs_config::configmap_name(&names.cluster))
        .await
        .map_err(kube_err("reading the agents' config ConfigMap"))?;
    let parameters_changed_at = dcs_config::changed_at(dcs_map.as_ref());
    let config_paused = dcs_config::paused(dcs_map.as_ref());
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let lease_holder = leases
        .get_opt(&names.leader_lease())
        .await
        .map_err(kube_err("reading the leader lease"))?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty());

    let mut views = Vec::new();
    let mut raw = HashMap::new();
    for pod in pods.items {
        views.push(pod_view(
            &pod,
            update_revision.as_deref(),
            parameters_changed_at,
        ));
        raw.insert(pod.name_any(), pod);
    }
    // A member that already follows a pause the `config` no longer shows (or the reverse)
    // counts as paused: the slower side decides, and a wrong guess only delays a scale-down.
    let paused = config_paused
        || views
            .iter()
            .any(|v| v.member.as_ref().is_some_and(|m| m.pause == Some(true)));
    Ok(Observed {
        pods: views,
        raw,
        lease_holder,
        statefulset_replicas,
        paused,
        template,
    })
}

/// A Pod as status and rollout see it. A Pod that runs the current template but started
/// before the parameters last changed (`parameters_changed_at`) and whose member reports
/// `pending_restart` is outdated too: the rollout restarts it like one of an older revision.
pub fn pod_view(
    pod: &Pod,
    update_revision: Option<&str>,
    parameters_changed_at: Option<chrono::DateTime<chrono::Utc>>,
) -> PodView {
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let revision = pod.labels().get("controller-revision-hash");
    let member = member_of(pod.annotations().get(MEMBER_ANNOTATION).map(String::as_str));
    let started_before_change = match (parameters_changed_at, &pod.meta().creation_timestamp) {
        (Some(changed), Some(created)) => created.0 < changed,
        _ => false,
    };
    let pending_restart = started_before_change
        && member
            .as_ref()
            .is_some_and(|m| m.pending_restart == Some(true));
    PodView {
        name: pod.name_any(),
        ready,
        // Before the StatefulSet controller reports a revision there is nothing to roll.
        current_revision: !pending_restart
            && match (update_revision, revision) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            },
        terminating: pod.meta().deletion_timestamp.is_some(),
        member,
    }
}

async fn write_status(
    pg: &PostgresCluster,
    clusters: &Api<PostgresCluster>,
    observed: &Observed,
    spec_errors: &[SpecError],
    rollout: Option<String>,
    scale_down: Option<status::ProgressNote>,
    upgrade: Option<crate::crd::UpgradeStatus>,
) -> Result<(), Error> {
    let input = StatusInput {
        generation: pg.meta().generation,
        desired_members: pg.spec.instances.replicas,
        lease_holder: observed.lease_holder.clone(),
        pods: observed.pods.clone(),
        spec_errors,
        rollout,
        scale_down,
        previous: pg.status.as_ref(),
        now: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    let mut status: PostgresClusterStatus = status::compute(&input);
    if upgrade.is_some() {
        status.upgrade = upgrade;
    }
    if pg.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let patch = serde_json::json!({ "status": status });
    clusters
        .patch_status(
            &pg.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(kube_err("writing status"))?;
    Ok(())
}

/// Deletes a member Pod (the StatefulSet makes it again, at the current revision). The uid
/// precondition makes sure we delete the Pod we judged, not a successor.
async fn delete_pod(
    client: &Client,
    names: &Names,
    observed: &Observed,
    name: &str,
) -> Result<(), Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &names.namespace);
    let uid = observed.raw.get(name).and_then(|p| p.uid());
    let params = DeleteParams {
        preconditions: uid.map(|uid| Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match pods.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(kube_err(format!("deleting pod {name}"))(e)),
    }
}

async fn execute_step(
    pg: &PostgresCluster,
    client: &Client,
    observed: &Observed,
    step: &Step,
) -> Result<(), Error> {
    let names = Names::of(pg);
    match step {
        Step::UpToDate | Step::Wait(_) => Ok(()),
        Step::RestartReplica(name) | Step::RestartPrimary(name) => {
            info!(cluster = %names.cluster, pod = %name, "rollout: {step}");
            delete_pod(client, &names, observed, name).await
        }
        Step::Switchover { primary, candidate } => {
            info!(cluster = %names.cluster, "rollout: {step}");
            switchover(client, &names, observed, primary, candidate).await
        }
    }
}

/// Asks `primary`'s agent for a planned switchover to `candidate` (the rollout's, or a
/// departing leader's before a scale-down). Returns once the agent answered: 200 means
/// `candidate` took over.
async fn switchover(
    client: &Client,
    names: &Names,
    observed: &Observed,
    primary: &str,
    candidate: &str,
) -> Result<(), Error> {
    let api_url = observed
        .raw
        .get(primary)
        .and_then(|p| member_of(p.annotations().get(MEMBER_ANNOTATION).map(String::as_str)))
        .map(|m| m.api_url)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| Error::NoApiUrl(primary.to_owned()))?;
    let credentials = restapi_credentials(client, names).await?;
    agent_api::switchover(
        &api_url,
        primary,
        candidate,
        credentials.as_ref(),
        SWITCHOVER_TIMEOUT,
    )
    .await
    .map_err(|source| Error::Switchover {
        primary: primary.to_owned(),
        candidate: candidate.to_owned(),
        source,
    })?;
    Ok(())
}

/// The on-demand backup of the `pgwarden.io/backup` annotation ([`manual_backup`]): asks the
/// leader for it once per id and follows it into `status.manualBackup`. Returns whether a
/// backup is still to be started or followed (the reconcile then looks again soon). An agent
/// that refuses (409 a backup runs, 503 a switchover is due, 421 not the leader any more) or
/// does not answer is asked again at the next reconcile; only an accepted id is recorded.
async fn sync_manual_backup(
    pg: &PostgresCluster,
    ctx: &Context,
    clusters: &Api<PostgresCluster>,
    observed: &Observed,
) -> Result<bool, Error> {
    let names = Names::of(pg);
    let client = &ctx.client;
    let key = ObjectRef::from_obj(pg);
    let api_url_of = |pod: &str| {
        observed
            .raw
            .get(pod)
            .and_then(|p| member_of(p.annotations().get(MEMBER_ANNOTATION).map(String::as_str)))
            .map(|m| m.api_url)
            .filter(|u| !u.is_empty())
    };
    let update = match manual_backup::need(pg) {
        Need::Nothing => return Ok(false),
        Need::Start { id, kind, repo } => {
            let started = ctx
                .backups_started
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .cloned();
            if started.as_deref() == Some(id.as_str()) {
                // Accepted, but this object predates our status write: wait for the watch.
                return Ok(true);
            }
            let Some(leader) = &observed.lease_holder else {
                debug!(cluster = %names.cluster, %id, "on-demand backup waits for a leader");
                return Ok(true);
            };
            let Some(api_url) = api_url_of(leader) else {
                return Ok(true);
            };
            let credentials = restapi_credentials(client, &names).await?;
            match agent_api::backup(
                &api_url,
                kind.as_deref(),
                repo,
                credentials.as_ref(),
                BACKUP_CALL_TIMEOUT,
            )
            .await
            {
                Ok(body) => match manual_backup::accepted(&id, &body) {
                    Some(status) => {
                        info!(cluster = %names.cluster, %id, member = %status.member, kind = %status.kind, "on-demand backup started");
                        status
                    }
                    None => {
                        warn!(cluster = %names.cluster, %id, %body, "the agent accepted the backup with an answer the controller does not understand");
                        return Ok(true);
                    }
                },
                Err(agent_api::AgentApiError::Refused {
                    status: 400, body, ..
                }) => {
                    // A request the agent will never accept: record it, do not retry.
                    warn!(cluster = %names.cluster, %id, %body, "on-demand backup refused");
                    crate::crd::ManualBackupStatus {
                        id,
                        kind: kind.unwrap_or_default(),
                        member: leader.clone(),
                        finished: true,
                        message: body,
                        ..Default::default()
                    }
                }
                Err(e) => {
                    info!(cluster = %names.cluster, %id, error = %e, "on-demand backup not started yet; retrying");
                    return Ok(true);
                }
            }
        }
        Need::Follow => {
            let Some(current) = pg.status.as_ref().and_then(|s| s.manual_backup.clone()) else {
                return Ok(false);
            };
            let Some(api_url) = api_url_of(&current.member) else {
                return Ok(true);
            };
            let report = match agent_api::patroni(&api_url, BACKUP_CALL_TIMEOUT).await {
                Ok(body) => serde_json::from_str(&body).unwrap_or_default(),
                Err(e) => {
                    debug!(cluster = %names.cluster, error = %e, "cannot read the backup's progress");
                    return Ok(true);
                }
            };
            match manual_backup::progress(&current, &report, chrono::Utc::now()) {
                None => return Ok(true),
                Some(done) => {
                    info!(cluster = %names.cluster, id = %done.id, succeeded = done.succeeded, message = %done.message, "on-demand backup ended");
                    done
                }
            }
        }
    };
    let pending = !update.finished;
    ctx.backups_started
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, update.id.clone());
    let patch = serde_json::json!({ "status": { "manualBackup": update } });
    clusters
        .patch_status(
            &pg.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(kube_err("writing the on-demand backup's status"))?;
    Ok(pending)
}

async fn restapi_credentials(
    client: &Client,
    names: &Names,
) -> Result<Option<ApiCredentials>, Error> {
    let username = secret_field(client, names, &names.restapi_secret(), "username").await?;
    let password = secret_field(client, names, &names.restapi_secret(), "password").await?;
    Ok(username
        .zip(password)
        .map(|(username, password)| ApiCredentials { username, password }))
}

/// One key of a Secret in the cluster's namespace; `None` when the Secret or key is missing.
pub(crate) async fn secret_field(
    client: &Client,
    names: &Names,
    secret: &str,
    key: &str,
) -> Result<Option<String>, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &names.namespace);
    let secret = secrets
        .get_opt(secret)
        .await
        .map_err(kube_err(format!("reading the secret {secret}")))?;
    Ok(secret.and_then(|s| {
        s.data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
    }))
}

/// `spec.users` and `spec.databases` on the running primary, once per generation and primary.
/// Not for a standby cluster: its leader is read-only, the roles come from the source.
async fn ensure_users_and_databases(
    pg: &PostgresCluster,
    ctx: &Context,
    observed: &Observed,
) -> Result<(), Error> {
    let spec = &pg.spec;
    if (spec.users.is_empty() && spec.databases.is_empty()) || spec.standby.is_some() {
        return Ok(());
    }
    let Some(primary) = observed.lease_holder.as_deref() else {
        return Ok(());
    };
    let Some(member) = observed
        .pods
        .iter()
        .find(|p| p.name == primary && p.ready)
        .and_then(|p| p.member.as_ref())
        .filter(|m| m.state == "running" && m.is_primary_role())
    else {
        return Ok(());
    };
    let conn_url = member.conn_url.clone();
    if conn_url.is_empty() {
        return Ok(());
    }
    let key = ObjectRef::from_obj(pg);
    let done = (pg.meta().generation, primary.to_owned());
    let already = ctx
        .ensured
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        == Some(&done);
    if already {
        return Ok(());
    }
    let names = Names::of(pg);
    let client = &ctx.client;
    let Some(superuser) =
        secret_field(client, &names, &names.superuser_secret(), "password").await?
    else {
        return Ok(());
    };
    let mut users = Vec::new();
    for user in &spec.users {
        let Some(password) =
            secret_field(client, &names, &names.user_secret(&user.name), "password").await?
        else {
            return Ok(());
        };
        users.push(crate::sql::NewUser {
            spec: user,
            password,
        });
    }
    let changed = crate::sql::ensure(&conn_url, &superuser, &users, &spec.databases)
        .await
        .map_err(Error::Sql)?;
    if !changed.is_empty() {
        info!(cluster = %names.cluster, primary = %primary, changed = %changed.join(", "), "applied spec.users/spec.databases in PostgreSQL");
    }
    ctx.ensured
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, done);
    Ok(())
}

/// `spec.pooler`'s role and `auth_query` function on the running primary ([`crate::pooler`]).
async fn ensure_pooler_role(
    pg: &PostgresCluster,
    ctx: &Context,
    observed: &Observed,
) -> Result<(), Error> {
    if pg.spec.pooler.is_none() {
        return Ok(());
    }
    let Some(primary) = observed.lease_holder.as_deref() else {
        return Ok(());
    };
    let Some(conn_url) = observed
        .pods
        .iter()
        .find(|p| p.name == primary && p.ready)
        .and_then(|p| p.member.as_ref())
        .filter(|m| m.state == "running" && m.is_primary_role() && !m.conn_url.is_empty())
        .map(|m| m.conn_url.clone())
    else {
        return Ok(());
    };
    let names = Names::of(pg);
    let Some(superuser) =
        secret_field(&ctx.client, &names, &names.superuser_secret(), "password").await?
    else {
        return Ok(());
    };
    crate::pooler::ensure_on_primary(pg, ctx, primary, &conn_url, &superuser).await
}

/// The ordinal of a member's data PVC (`data-<statefulset>-<n>`), if `name` is one.
pub fn pvc_ordinal(name: &str, statefulset: &str) -> Option<i32> {
    name.strip_prefix("data-")?
        .strip_prefix(statefulset)?
        .strip_prefix('-')?
        .parse()
        .ok()
        .filter(|n: &i32| *n >= 0)
}

/// After a scale-down with `pvcRetention: Delete`: the data PVCs of the ordinals at or above
/// `replicas` (the StatefulSet's count: a scale-down held for a switchover keeps its members'
/// volumes) whose Pod is gone. (A departed member's record leaves with its Pod: it is
/// an annotation of the Pod.) With `Retain` they stay, and a scale-up reuses them.
async fn delete_departed_pvcs(
    pg: &PostgresCluster,
    client: &Client,
    observed: &Observed,
    replicas: i32,
) -> Result<(), Error> {
    let names = Names::of(pg);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &names.namespace);
    let selector = render::selector_labels(&names)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let list = pvcs
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_err("listing the PVCs"))?;
    let statefulset = names.statefulset();
    for pvc in list.items {
        let name = pvc.name_any();
        let Some(ordinal) = pvc_ordinal(&name, &statefulset) else {
            continue;
        };
        if ordinal < replicas
            || pvc.meta().deletion_timestamp.is_some()
            || observed
                .raw
                .contains_key(&format!("{statefulset}-{ordinal}"))
        {
            continue;
        }
        let params = DeleteParams {
            preconditions: pvc.uid().map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match pvcs.delete(&name, &params).await {
            Ok(_) => {
                info!(cluster = %names.cluster, pvc = %name, "deleted a departed member's data volume (pvcRetention: Delete)")
            }
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(kube_err(format!("deleting the PVC {name}"))(e)),
        }
    }
    Ok(())
}

/// Adds the PVC finalizer while `pvcRetention: Delete`, removes it otherwise.
async fn sync_finalizer(
    pg: &PostgresCluster,
    clusters: &Api<PostgresCluster>,
) -> Result<(), Error> {
    let want = pg.spec.pvc_retention == PvcRetention::Delete;
    let finalizers = pg.finalizers();
    let has = finalizers.iter().any(|f| f == PVC_FINALIZER);
    if want == has {
        return Ok(());
    }
    let mut new: Vec<String> = finalizers
        .iter()
        .filter(|f| *f != PVC_FINALIZER)
        .cloned()
        .collect();
    if want {
        new.push(PVC_FINALIZER.to_owned());
    }
    patch_finalizers(pg, clusters, new).await
}

/// A JSON patch guarded by the resourceVersion we read, so a concurrent change of the
/// finalizer list by someone else is not overwritten.
async fn patch_finalizers(
    pg: &PostgresCluster,
    clusters: &Api<PostgresCluster>,
    finalizers: Vec<String>,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": pg.resource_version(),
        }
    });
    clusters
        .patch(
            &pg.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(kube_err("updating finalizers"))?;
    Ok(())
}

/// A cluster being deleted. Its children go with the garbage collector (owner references);
/// only with `pvcRetention: Delete` does the controller delete the StatefulSet and then the
/// PVCs before letting the cluster go.
async fn cleanup(pg: &PostgresCluster, ctx: &Context) -> Result<Action, Error> {
    if !pg.finalizers().iter().any(|f| f == PVC_FINALIZER) {
        return Ok(Action::await_change());
    }
    let names = Names::of(pg);
    let client = ctx.client.clone();
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &names.namespace);
    match sts
        .delete(&names.statefulset(), &DeleteParams::foreground())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(kube_err("deleting the statefulset")(e)),
    }
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &names.namespace);
    let selector = render::selector_labels(&names)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    pvcs.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels(&selector),
    )
    .await
    .map_err(kube_err("deleting the PVCs"))?;
    info!(cluster = %names.cluster, "deleted the data volumes (pvcRetention: Delete)");
    let clusters: Api<PostgresCluster> = Api::namespaced(client, &names.namespace);
    let remaining = pg
        .finalizers()
        .iter()
        .filter(|f| *f != PVC_FINALIZER)
        .cloned()
        .collect();
    patch_finalizers(pg, &clusters, remaining).await?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::pvc_ordinal;

    #[test]
    fn only_the_statefulsets_data_pvcs_have_an_ordinal() {
        assert_eq!(pvc_ordinal("data-pg-2", "pg"), Some(2));
        assert_eq!(pvc_ordinal("data-pg-10", "pg"), Some(10));
        assert_eq!(pvc_ordinal("data-pg-x-2", "pg"), None);
        assert_eq!(pvc_ordinal("data-pgx-2", "pg"), None);
        assert_eq!(pvc_ordinal("wal-pg-2", "pg"), None);
        assert_eq!(pvc_ordinal("data-pg-", "pg"), None);
    }
}
