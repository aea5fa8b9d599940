//! `pgwarden-bench controller-scale`: one `pgwarden-controller` and N `PostgresCluster`s on a
//! real kube-apiserver v1.20 and kube-controller-manager (the test harness's control plane, owned
//! by this run and stopped by PID at its end). No Pods run: the StatefulSet controller creates
//! them, nothing schedules them. So this measures the controller and the apiserver only.
//!
//! 1. Apply N clusters (`deploy/examples/minimal.yaml`, renamed) as fast as the API accepts
//!    them; per cluster, the time from its apply until every object the controller owns exists
//!    and until its status reports the applied generation (`status.observedGeneration`).
//! 2. With all N reconciled, change `spec.instances.resources` of one cluster at a time: the
//!    time until the StatefulSet's Pod template carries the new value (and until the status
//!    reports the new generation).
//! 3. The controller's memory and CPU after convergence, over an idle window, and at the end;
//!    the apiserver's CPU and request rate over the same window.
//!
//! Without `--pods-ready` the members' Pods stay unscheduled, so no cluster is ever Ready and
//! the controller looks at each again every 5 s (its requeue while members start): the load
//! of N clusters that are all starting. With it, the benchmark binds every Pod and reports it
//! Ready as a kubelet would once the agents run (they still do not: no member records, no
//! leader), so the controller looks again only on events and every 300 s: the steady state of
//! N healthy clusters.
//!
//! Arrival times come from watches opened before the first apply (one per kind, the whole
//! namespace), not from polling: polling 200 clusters' objects would load the apiserver that is
//! being measured, and would quantise the times to the polling period.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1beta1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ApiResource, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Resource, ResourceExt};
use pgwarden_controller::crd::PostgresCluster;
use pgwarden_controller::render::Names;
use pgwarden_tests::harness::kube::{
    set_pod_ready_with, KubeAccess, KubeCluster, KubeOptions, ADMIN_TOKEN, TEST_NODE,
};
use pgwarden_tests::harness::operator::{
    apply_manifest, bind_controller_role, install_crd, yaml_documents, ControllerProcess,
};
use serde::Serialize;
use serde_json::json;

use crate::procstat;

const IDENTITY: &str = "ctl-scale";

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Number of PostgresClusters.
    #[arg(long, default_value_t = 200)]
    clusters: usize,
    /// Members per cluster (`spec.instances.replicas`; their Pods are created, never run).
    #[arg(long, default_value_t = 3)]
    replicas: i32,
    /// Spec changes timed, one at a time, on clusters spread over the N.
    #[arg(long, default_value_t = 10)]
    samples: usize,
    /// Applies in flight at once.
    #[arg(long, default_value_t = 16)]
    apply_concurrency: usize,
    /// Bind every member Pod and report it Ready (as a kubelet would for running agents) before
    /// the idle window and the spec changes: the steady state of healthy clusters instead of
    /// clusters that never start.
    #[arg(long)]
    pods_ready: bool,
    /// Idle window for the controller's CPU, seconds.
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// Give up waiting for convergence (or for one spec change) after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    /// Where controller-scale.json goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

/// When the watches first saw what the benchmark waits for.
#[derive(Default)]
struct Seen {
    /// (kind, name) of an object in the namespace.
    objects: HashMap<(&'static str, String), Instant>,
    /// (cluster, generation) that `status.observedGeneration` reported.
    reconciled: HashMap<(String, i64), Instant>,
    /// (StatefulSet, the CPU request in its Pod template).
    template_cpu: HashMap<(String, String), Instant>,
}

type Shared = Arc<Mutex<Seen>>;

fn lock(seen: &Shared) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|e| e.into_inner())
}

/// The objects a cluster owns, by kind and name: what `reconcile::apply_children` applies (the
/// names from the controller's own `render::Names`, so the two cannot drift apart).
fn owned_objects(cluster: &str, namespace: &str) -> Vec<(&'static str, String)> {
    let n = Names {
        cluster: cluster.to_owned(),
        namespace: namespace.to_owned(),
    };
    vec![
        ("Secret", n.superuser_secret()),
        ("Secret", n.replication_secret()),
        ("Secret", n.restapi_secret()),
        ("ServiceAccount", n.agent_account()),
        ("Role", n.agent_account()),
        ("RoleBinding", n.agent_account()),
        ("ConfigMap", n.agent_configmap()),
        ("Service", n.headless_service()),
        ("Service", n.primary_service()),
        ("Service", n.replicas_service()),
        ("PodDisruptionBudget", n.statefulset()),
        ("StatefulSet", n.statefulset()),
    ]
}

/// Records the first sighting of every object of kind `K` in `namespace`, and hands each
/// object to `extra` (with the same instant) for what else is waited for.
fn watch<K>(
    api: Api<K>,
    kind: &'static str,
    seen: Shared,
    extra: fn(&K, &mut Seen, Instant),
) -> tokio::task::JoinHandle<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        loop {
            match stream.try_next().await {
                Ok(Some(obj)) => {
                    let now = Instant::now();
                    let mut s = lock(&seen);
                    s.objects.entry((kind, obj.name_any())).or_insert(now);
                    extra(&obj, &mut s, now);
                }
                Ok(None) => return,
                // The backoff retries; a lost event only delays a sighting to the relist.
                Err(e) => eprintln!("bench: watch of {kind}: {e}"),
            }
        }
    })
}

fn nothing<K>(_: &K, _: &mut Seen, _: Instant) {}

fn cluster_status(pg: &PostgresCluster, s: &mut Seen, now: Instant) {
    if let Some(g) = pg.status.as_ref().and_then(|st| st.observed_generation) {
        s.reconciled.entry((pg.name_any(), g)).or_insert(now);
    }
}

fn statefulset_cpu(set: &StatefulSet, s: &mut Seen, now: Instant) {
    if let Some(cpu) = template_cpu(set) {
        s.template_cpu.entry((set.name_any(), cpu)).or_insert(now);
    }
}

fn template_cpu(set: &StatefulSet) -> Option<String> {
    let container = set
        .spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?;
    let q = container
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("cpu")?;
    Some(q.0.clone())
}

/// Percentile by nearest rank (`p` in 0..=1) of unsorted values.
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (p * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    pub n: usize,
    pub p50: f64,
    pub p95: f64,
    pub max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Spread {
        Spread {
            n: values.len(),
            p50: percentile(values, 0.5),
            p95: percentile(values, 0.95),
            max: percentile(values, 1.0),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} s, p95 {:.2} s, max {:.2} s (n = {})",
            self.p50, self.p95, self.max, self.n
        )
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Footprint {
    pub rss_mib: f64,
    pub hwm_mib: f64,
    pub cpu_s: f64,
}

impl Footprint {
    fn of(s: procstat::Sample) -> Footprint {
        Footprint {
            rss_mib: s.rss_kib as f64 / 1024.0,
            hwm_mib: s.hwm_kib as f64 / 1024.0,
            cpu_s: s.cpu_ns as f64 / 1e9,
        }
    }
}

impl std::fmt::Display for Footprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VmRSS {:.1} MiB, VmHWM {:.1} MiB, CPU {:.1} s",
            self.rss_mib, self.hwm_mib, self.cpu_s
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub machine: String,
    pub started: String,
    pub controller_binary: String,
    pub clusters: usize,
    pub replicas: i32,
    pub pods_ready: bool,
    /// With `--pods-ready`: from the last Pod reported Ready until the controller's reconciles
    /// fell to at most 2 in 5 s (60 when they did not).
    pub settle_s: Option<f64>,
    pub apply_concurrency: usize,
    /// First apply sent → last apply accepted.
    pub apply_all_s: f64,
    /// First apply sent → every owned object of every cluster seen.
    pub all_objects_s: f64,
    /// First apply sent → every cluster's status reports generation 1.
    pub all_reconciled_s: f64,
    /// Per cluster: its apply sent → its last owned object seen.
    pub per_cluster_objects: Spread,
    /// Per cluster: its apply sent → its status reports generation 1.
    pub per_cluster_reconciled: Spread,
    /// Spec change sent → the StatefulSet's Pod template carries it.
    pub spec_change_template: Spread,
    /// Spec change sent → the status reports the new generation.
    pub spec_change_status: Spread,
    pub controller_converged: Footprint,
    pub controller_after_idle: Footprint,
    pub controller_end: Footprint,
    pub idle_secs: u64,
    /// Controller CPU over the idle window, percent of one core.
    pub controller_idle_cpu_percent: f64,
    /// Reconciles per second over the idle window (from the controller's debug log).
    pub idle_reconciles_per_s: f64,
    pub apiserver_converged: Footprint,
    pub apiserver_idle_cpu_percent: f64,
    /// Requests the apiserver served per second over the idle window, from every client (the
    /// controller's share dominates: kube-controller-manager has nothing to do).
    pub apiserver_idle_requests_per_s: f64,
    /// `reconcile failed` warnings in the controller's log over the whole run.
    pub reconcile_failures: usize,
}

/// Lines of the controller's log that say a reconcile completed, and that one failed.
fn log_counts(log: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let done = text
        .lines()
        .filter(|l| l.contains("reconciled") && l.contains("DEBUG"))
        .count();
    let failed = text
        .lines()
        .filter(|l| l.contains("reconcile failed"))
        .count();
    (done, failed)
}

pub async fn run(opts: Options, machine: String) -> anyhow::Result<()> {
    anyhow::ensure!(opts.clusters > 0, "--clusters must be at least 1");
    // Measure the optimised controller when it was built next to this binary (as the main
    // benchmark does for the agent); otherwise the harness builds a debug one.
    if std::env::var_os("PGWARDEN_CONTROLLER_BIN").is_none() {
        if let Some(release) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("pgwarden-controller")))
            .filter(|p| p.exists())
        {
            std::env::set_var("PGWARDEN_CONTROLLER_BIN", release);
        }
    }
    let timeout = Duration::from_secs(opts.timeout_secs);
    std::fs::create_dir_all(&opts.out)?;
    let started = chrono::Utc::now().to_rfc3339();

    eprintln!("bench: starting etcd, kube-apiserver and kube-controller-manager");
    // Owned, not the harness's shared one: stopped by PID when this value drops, and its
    // apiserver's PID is known for the footprint.
    let kube = KubeCluster::start(KubeOptions {
        controller_manager: true,
    })
    .await?;
    let access = kube.access.clone();
    install_crd(&access).await?;
    let ns = access.create_namespace("scale").await?;
    bind_controller_role(&access, &ns).await?;
    let admin = access.admin_client().await?;
    let dir = kube.dir.join("controller");

    let seen: Shared = Arc::default();
    let c = admin.clone();
    let watches = vec![
        watch(
            Api::<Secret>::namespaced(c.clone(), &ns),
            "Secret",
            seen.clone(),
            nothing,
        ),
        watch(
            Api::<ServiceAccount>::namespaced(c.clone(), &ns),
            "ServiceAccount",
            seen.clone(),
            nothing,
        ),
        watch(
            Api::<Role>::namespaced(c.clone(), &ns),
            "Role",
            seen.clone(),
            nothing,
        ),
        watch(
            Api::<RoleBinding>::namespaced(c.clone(), &ns),
            "RoleBinding",
            seen.clone(),
            nothing,
        ),
        watch(
            Api::<ConfigMap>::namespaced(c.clone(), &ns),
            "ConfigMap",
            seen.clone(),
            nothing,
        ),
        watch(
            Api::<Service>::namespaced(c.clone(), &ns),
            "Service",
            seen.clone(),
            nothing,
        ),
        watch(
            Api::<PodDisruptionBudget>::namespaced(c.clone(), &ns),
            "PodDisruptionBudget",
            seen.clone(),
            nothing,
        ),
        watch(
            Api::<StatefulSet>::namespaced(c.clone(), &ns),
            "StatefulSet",
            seen.clone(),
            statefulset_cpu,
        ),
        watch(
            Api::<PostgresCluster>::namespaced(c.clone(), &ns),
            "PostgresCluster",
            seen.clone(),
            cluster_status,
        ),
    ];
    let result = measure(
        &opts, &kube, &ns, &admin, &dir, &seen, timeout, machine, started,
    )
    .await;
    for w in watches {
        w.abort();
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    opts: &Options,
    kube: &KubeCluster,
    ns: &str,
    admin: &kube::Client,
    dir: &Path,
    seen: &Shared,
    timeout: Duration,
    machine: String,
    started: String,
) -> anyhow::Result<()> {
    let access = &kube.access;
    let mut controller = ControllerProcess::start(access, ns, dir, IDENTITY)?;
    let pid = controller.process.pid();
    let controller_binary = std::env::var("PGWARDEN_CONTROLLER_BIN").unwrap_or_default();
    eprintln!("bench: controller PID {pid} ({controller_binary}), waiting for its Lease");
    // The clock starts at the first apply, so the controller must already be the active one:
    // its election is not what is measured.
    let leases: Api<Lease> = Api::namespaced(admin.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let holder = leases
            .get_opt("pgwarden-controller")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity);
        if holder.as_deref() == Some(IDENTITY) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the controller did not take its Lease; its log ends:\n{}",
            controller.process.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let it open its watches on an empty namespace.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let template = yaml_documents("deploy/examples/minimal.yaml")?
        .into_iter()
        .next()
        .context("deploy/examples/minimal.yaml is empty")?;
    let template: serde_json::Value = serde_json::to_value(template)?;
    let names: Vec<String> = (0..opts.clusters).map(|i| format!("pg{i:04}")).collect();
    let resource = ApiResource::erase::<PostgresCluster>(&());

    // 1. Apply all, as fast as the API accepts them.
    eprintln!(
        "bench: applying {} clusters ({} in flight)",
        opts.clusters, opts.apply_concurrency
    );
    let t0 = Instant::now();
    let sent: Vec<(String, Instant)> = futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let mut manifest = template.clone();
            manifest["metadata"]["name"] = json!(name);
            manifest["spec"]["instances"]["replicas"] = json!(opts.replicas);
            let resource = resource.clone();
            async move {
                let at = Instant::now();
                apply_manifest(admin, ns, &resource, &manifest)
                    .await
                    .with_context(|| format!("apply {name}"))?;
                anyhow::Ok((name, at))
            }
        })
        .buffer_unordered(opts.apply_concurrency.max(1))
        .try_collect()
        .await?;
    let apply_all_s = t0.elapsed().as_secs_f64();
    let sent: HashMap<String, Instant> = sent.into_iter().collect();
    eprintln!("bench: all applied in {apply_all_s:.2} s; waiting for the owned objects and status");

    let wanted: Vec<(String, Vec<(&'static str, String)>)> = names
        .iter()
        .map(|n| (n.clone(), owned_objects(n, ns)))
        .collect();
    let mut last_progress = Instant::now();
    let (objects_at, reconciled_at) = loop {
        let (objects, reconciled, missing) = {
            let s = lock(seen);
            let mut objects = Vec::new();
            let mut reconciled = Vec::new();
            let mut missing = 0usize;
            for (cluster, owned) in &wanted {
                let times: Option<Vec<Instant>> =
                    owned.iter().map(|k| s.objects.get(k).copied()).collect();
                let status = s.reconciled.get(&(cluster.clone(), 1)).copied();
                match (times.and_then(|t| t.into_iter().max()), status) {
                    (Some(o), Some(r)) => {
                        objects.push((cluster.clone(), o));
                        reconciled.push((cluster.clone(), r));
                    }
                    _ => missing += 1,
                }
            }
            (objects, reconciled, missing)
        };
        if missing == 0 {
            break (objects, reconciled);
        }
        anyhow::ensure!(
            t0.elapsed() < timeout,
            "{missing} of {} clusters not reconciled after {timeout:?}; the controller's log ends:\n{}",
            opts.clusters,
            controller.process.log_tail(20)
        );
        if last_progress.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "bench: {:.0} s: {} of {} clusters complete",
                t0.elapsed().as_secs_f64(),
                opts.clusters - missing,
                opts.clusters
            );
            last_progress = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let since = |list: &[(String, Instant)]| -> Vec<f64> {
        list.iter()
            .filter_map(|(c, at)| Some(at.saturating_duration_since(*sent.get(c)?).as_secs_f64()))
            .collect()
    };
    let last = |list: &[(String, Instant)]| {
        list.iter()
            .map(|(_, at)| at.saturating_duration_since(t0).as_secs_f64())
            .fold(0.0, f64::max)
    };
    let per_cluster_objects = Spread::of(&since(&objects_at));
    let per_cluster_reconciled = Spread::of(&since(&reconciled_at));
    let all_objects_s = last(&objects_at);
    let all_reconciled_s = last(&reconciled_at);
    eprintln!(
        "bench: all objects in {all_objects_s:.2} s, all statuses in {all_reconciled_s:.2} s"
    );

    // 3. (first part) The footprint once converged, then over an idle window.
    let controller_converged = Footprint::of(procstat::sample(pid));
    let mut settle_s = None;
    if opts.pods_ready {
        let expected = opts.clusters * usize::try_from(opts.replicas.max(0)).unwrap_or(0);
        let t = Instant::now();
        make_pods_ready(access, admin, ns, expected, timeout).await?;
        eprintln!(
            "bench: {expected} Pods bound and Ready in {:.1} s; letting the reconciles settle",
            t.elapsed().as_secs_f64()
        );
        // Each Pod's change wakes its cluster's reconcile, and a saturated apiserver works
        // through them slowly: the window starts once they are done, or after a minute when
        // something keeps the controller busy (the window then shows it).
        let t = Instant::now();
        let mut before = log_counts(&controller.log).0;
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let now = log_counts(&controller.log).0;
            if now.saturating_sub(before) <= 2 || t.elapsed() > Duration::from_secs(60) {
                break;
            }
            before = now;
        }
        settle_s = Some(t.elapsed().as_secs_f64());
        eprintln!(
            "bench: reconciles settled after {:.0} s",
            t.elapsed().as_secs_f64()
        );
    }
    let apiserver_pid = kube.apiserver.pid();
    eprintln!("bench: idle window of {} s", opts.idle_secs);
    let (reconciles_before, _) = log_counts(&controller.log);
    let requests_before = apiserver_requests(access).await?;
    let window = Duration::from_secs(opts.idle_secs);
    let (ctl_idle, api_idle) = tokio::join!(
        procstat::idle_cpu(pid, window),
        procstat::idle_cpu(apiserver_pid, window)
    );
    let (reconciles_after, _) = log_counts(&controller.log);
    let requests_after = apiserver_requests(access).await?;
    let secs = window.as_secs_f64().max(1e-9);
    let controller_after_idle = Footprint::of(ctl_idle.1);
    let controller_idle_cpu_percent = ctl_idle.0 / secs * 100.0;
    let apiserver_idle_cpu_percent = api_idle.0 / secs * 100.0;
    let idle_reconciles_per_s = reconciles_after.saturating_sub(reconciles_before) as f64 / secs;
    let apiserver_idle_requests_per_s = (requests_after - requests_before) / secs;

    // 2. Spec changes, one at a time, on clusters spread over the N.
    let clusters: Api<PostgresCluster> = Api::namespaced(admin.clone(), ns);
    let mut to_template = Vec::new();
    let mut to_status = Vec::new();
    for k in 0..opts.samples {
        let cluster = &names[k * opts.clusters / opts.samples.max(1) % opts.clusters];
        // A CPU request is applied into the StatefulSet's Pod template at once, with no agent
        // involved (a parameter change would also wait on nothing, but lands in the ConfigMap
        // first); a fresh value per sample, so the sighting cannot be an earlier one's.
        let cpu = format!("{}m", 101 + k);
        let patch = json!({"spec": {"instances": {"resources": {"requests": {"cpu": cpu}}}}});
        let at = Instant::now();
        let patched = clusters
            .patch(cluster, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("change the spec of {cluster}"))?;
        let generation = patched.metadata.generation.unwrap_or(0);
        let deadline = at + timeout;
        let (template_at, status_at) = loop {
            let (t, s) = {
                let s = lock(seen);
                (
                    s.template_cpu.get(&(cluster.clone(), cpu.clone())).copied(),
                    s.reconciled.get(&(cluster.clone(), generation)).copied(),
                )
            };
            if let (Some(t), Some(s)) = (t, s) {
                break (t, s);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the spec change of {cluster} (generation {generation}) not reconciled after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let t = template_at.saturating_duration_since(at).as_secs_f64();
        let s = status_at.saturating_duration_since(at).as_secs_f64();
        eprintln!(
            "bench: spec change {} of {}: {cluster}: template {t:.3} s, status {s:.3} s",
            k + 1,
            opts.samples
        );
        to_template.push(t);
        to_status.push(s);
        // Apart, so that each change is reconciled on its own.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let controller_end = Footprint::of(procstat::sample(pid));
    let apiserver_converged = Footprint::of(api_idle.1);
    let (_, reconcile_failures) = log_counts(&controller.log);
    let results = Results {
        machine,
        started,
        controller_binary,
        clusters: opts.clusters,
        replicas: opts.replicas,
        pods_ready: opts.pods_ready,
        settle_s,
        apply_concurrency: opts.apply_concurrency,
        apply_all_s,
        all_objects_s,
        all_reconciled_s,
        per_cluster_objects,
        per_cluster_reconciled,
        spec_change_template: Spread::of(&to_template),
        spec_change_status: Spread::of(&to_status),
        controller_converged,
        controller_after_idle,
        controller_end,
        idle_secs: opts.idle_secs,
        controller_idle_cpu_percent,
        idle_reconciles_per_s,
        apiserver_converged,
        apiserver_idle_cpu_percent,
        apiserver_idle_requests_per_s,
        reconcile_failures,
    };
    let stopped = controller.stop();
    eprintln!("bench: controller stopped: {stopped:?}");
    let report = report(&results);
    let path = opts.out.join("controller-scale.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("write {}", path.display()))?;
    println!("{report}");
    println!("results in {}", path.display());
    Ok(())
}

/// Binds the `expected` member Pods (once the StatefulSet controller has created them) to the
/// harness's Node and reports each Running and Ready with an address of its own.
async fn make_pods_ready(
    access: &KubeAccess,
    admin: &kube::Client,
    ns: &str,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    access.ensure_node().await?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let selector = format!(
        "{}={}",
        pgwarden_controller::render::APPLICATION_LABEL,
        pgwarden_controller::render::APPLICATION
    );
    let deadline = Instant::now() + timeout;
    let list = loop {
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .context("list the member Pods")?;
        if list.items.len() >= expected {
            break list;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {expected} member Pods exist after {timeout:?}",
            list.items.len()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    futures::stream::iter(list.items.into_iter().enumerate())
        .map(|(i, pod)| {
            let pods = pods.clone();
            async move {
                let name = pod.name_any();
                if pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .is_none()
                {
                    let binding = serde_json::to_vec(&json!({
                        "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                        "target": {"apiVersion": "v1", "kind": "Node", "name": TEST_NODE},
                    }))?;
                    pods.create_subresource::<serde_json::Value>(
                        "binding",
                        &name,
                        &PostParams::default(),
                        binding,
                    )
                    .await
                    .with_context(|| format!("bind {name}"))?;
                }
                // Endpoints refuse loopback addresses; any distinct routable one will do.
                let ip = format!("10.244.{}.{}", i / 250, i % 250 + 1);
                set_pod_ready_with(admin, ns, &name, &ip, true).await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Requests the apiserver has served since it started (`apiserver_request_total`, every
/// verb, resource and code). Read with curl, as the harness checks readiness: kube's client
/// takes a raw request only as an `http` crate type, a dependency of its own for one GET.
async fn apiserver_requests(access: &KubeAccess) -> anyhow::Result<f64> {
    let out = tokio::process::Command::new("curl")
        .args(["-sfk", "--max-time", "10", "-H"])
        .arg(format!("Authorization: Bearer {ADMIN_TOKEN}"))
        .arg(format!("{}/metrics", access.base_url))
        .output()
        .await
        .context("run curl for the apiserver's /metrics")?;
    anyhow::ensure!(
        out.status.success(),
        "GET /metrics failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

fn report(r: &Results) -> String {
    format!(
        "Controller at scale: {clusters} PostgresClusters of {replicas} members in one namespace \
         (no Pods run; {pods})\n\
         Machine: {machine}\n\
         Controller: {bin}\n\
         \n\
         Apply all {clusters} ({conc} in flight):            {apply:.2} s\n\
         First apply → every owned object exists:    {objects:.2} s\n\
         First apply → every status reconciled:      {status:.2} s\n\
         Per cluster, apply → its objects exist:     {pco}\n\
         Per cluster, apply → its status reconciled: {pcs}\n\
         \n\
         Spec change → StatefulSet template updated: {sct}\n\
         Spec change → status observedGeneration:    {scs}\n\
         \n\
         Controller once converged:  {cc}\n\
         {settle}\
         Controller after {idle} s idle: {ci}; CPU {cpu:.1} % of a core over the window, \
         {rps:.1} reconciles/s\n\
         Controller at the end:      {ce}\n\
         kube-apiserver after idle:  {ac}; CPU {acpu:.1} % over the window, {arps:.0} requests/s\n\
         Reconcile failures logged:  {fail}\n",
        clusters = r.clusters,
        replicas = r.replicas,
        machine = r.machine,
        bin = r.controller_binary,
        conc = r.apply_concurrency,
        apply = r.apply_all_s,
        objects = r.all_objects_s,
        status = r.all_reconciled_s,
        pco = r.per_cluster_objects,
        pcs = r.per_cluster_reconciled,
        sct = r.spec_change_template,
        scs = r.spec_change_status,
        cc = r.controller_converged,
        settle = r
            .settle_s
            .map(|t| {
                if t > 60.0 {
                    "Reconciles had not settled 60 s after the last Pod was Ready\n".to_owned()
                } else {
                    format!("Reconciles settled {t:.0} s after the last Pod was Ready\n")
                }
            })
            .unwrap_or_default(),
        idle = r.idle_secs,
        ci = r.controller_after_idle,
        cpu = r.controller_idle_cpu_percent,
        rps = r.idle_reconciles_per_s,
        ce = r.controller_end,
        ac = r.apiserver_converged,
        acpu = r.apiserver_idle_cpu_percent,
        arps = r.apiserver_idle_requests_per_s,
        pods = if r.pods_ready {
            "Pods bound and reported Ready"
        } else {
            "Pods left unscheduled"
        },
        fail = r.reconcile_failures,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 10.0);
        assert_eq!(percentile(&v, 0.95), 19.0);
        assert_eq!(percentile(&v, 1.0), 20.0);
        assert_eq!(percentile(&[3.0], 0.5), 3.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
