//! The pgwarden controller under test, against the real control plane of [`super::kube`]:
//! the CRD installed from `deploy/crd.yaml`, the controller's ClusterRole from
//! `deploy/controller.yaml` bound to [`CONTROLLER_USER`] (so a verb the controller lacks fails
//! a test), `pgwarden-controller` as a process ([`ControllerProcess`]), manifests applied as
//! `kubectl apply --server-side` does ([`apply_manifest`]), and a kubelet for the Pods the
//! StatefulSet controller creates ([`PodKubelet`]).
//!
//! # The kubelet
//! Nothing schedules or runs the StatefulSet's Pods, so [`PodKubelet`] does, every 250 ms:
//! - binds an unscheduled Pod to [`super::kube::TEST_NODE`];
//! - starts a bound Pod's container as a real agent process: the container's `env` is resolved
//!   as a kubelet would (`value` with `$(VAR)` expansion, `fieldRef` of the Pod's name,
//!   namespace and IP, `secretKeyRef` from the Secrets the controller created), the
//!   configuration file named by the container's `command` is read from the ConfigMap mounted at
//!   that path, and the agent authenticates with the token of the Pod's ServiceAccount (bound by
//!   the controller's Role). What the test must change, and only that, is set through the
//!   agent's own environment overrides: loopback listen/connect addresses on free ports and the
//!   data directory in the test directory;
//! - runs a Pod's init containers first, one after the other, to completion (the only one the
//!   controller makes is `pgwarden upgrade-data-dir --if-needed <config file>`, run as the agent
//!   binary with the container's own resolved environment and the same overrides); one that
//!   fails is run again at a later tick, as the kubelet restarts it;
//! - maps the image's PostgreSQL binaries to the host's: `/usr/lib/postgresql/17/bin` (not
//!   installed on the test host) is where `scripts/build-postgres17.sh` puts them;
//! - copies the agent's `GET /readiness` into the Pod's `Ready` condition;
//! - restarts a container whose process exited (the test may hold a Pod to delay that);
//! - for a Pod being deleted (a rollout step): SIGTERM, waits for the agent to exit, then
//!   removes the Pod (grace period 0), as the kubelet confirms a graceful deletion; the
//!   StatefulSet controller then creates the Pod again, at the new revision.
//!
//! Every start and stop is recorded with the leader Lease's holder at that moment
//! ([`KubeletEvent`]), which is how a test checks the order of a rollout.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions,
};
use kube::ResourceExt;
use serde::Deserialize as _;
use serde_json::json;
use tokio::sync::Mutex;

use super::kube::{set_pod_ready_with, KubeAccess, CONTROLLER_TOKEN, CONTROLLER_USER};
use super::process::ProcessGuard;
use super::{http_request, wait_until, ClusterOptions, TestEnv};

/// Field manager of the test's own applies (the CRD, the ClusterRole).
const TEST_MANAGER: &str = "pgwarden-tests";

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The YAML documents of a file under the repository root.
pub fn yaml_documents(path: &str) -> anyhow::Result<Vec<serde_yaml::Value>> {
    let file = repo_file(path);
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The `pgwarden-controller` binary, built once per test process.
pub fn controller_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("PGWARDEN_CONTROLLER_BIN") {
            return PathBuf::from(p);
        }
        let root = repo_file("");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "pgwarden-controller", "--bins"])
            .current_dir(&root)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building pgwarden-controller failed");
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"))
            .join("debug")
            .join("pgwarden-controller")
    })
    .clone()
}

/// Installs the CRD from `deploy/crd.yaml` (server-side apply, so every test may call it) and
/// waits until the API server serves it (`Established`).
pub async fn install_crd(access: &KubeAccess) -> anyhow::Result<()> {
    let docs = yaml_documents("deploy/crd.yaml")?;
    let doc = docs
        .into_iter()
        .next()
        .context("deploy/crd.yaml is empty")?;
    let crd: CustomResourceDefinition = serde_yaml::from_value(doc)?;
    let name = crd.name_any();
    let api: Api<CustomResourceDefinition> = Api::all(access.admin_client().await?);
    api.patch(
        &name,
        &PatchParams::apply(TEST_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .with_context(|| format!("apply the CRD {name}"))?;
    wait_until(
        "the CRD is established",
        Duration::from_secs(30),
        || async {
            let Ok(crd) = api.get(&name).await else {
                return false;
            };
            crd.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        },
    )
    .await;
    Ok(())
}

/// Creates the controller's ClusterRole from `deploy/controller.yaml` and binds it in
/// `namespace` to [`CONTROLLER_USER`] (what a controller watching one namespace needs).
pub async fn bind_controller_role(access: &KubeAccess, namespace: &str) -> anyhow::Result<()> {
    let role = yaml_documents("deploy/controller.yaml")?
        .into_iter()
        .find(|d| d.get("kind").and_then(|k| k.as_str()) == Some("ClusterRole"))
        .context("deploy/controller.yaml has no ClusterRole")?;
    let role: ClusterRole = serde_yaml::from_value(role)?;
    let name = role.name_any();
    let client = access.admin_client().await?;
    Api::<ClusterRole>::all(client.clone())
        .patch(
            &name,
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(&role),
        )
        .await
        .context("apply the controller's ClusterRole")?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "pgwarden-controller", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": CONTROLLER_USER}],
    }))?;
    Api::<RoleBinding>::namespaced(client, namespace)
        .patch(
            "pgwarden-controller",
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(&binding),
        )
        .await
        .context("bind the controller's ClusterRole")?;
    Ok(())
}

/// `kubectl apply --server-side -f -` of one object (field manager `kubectl`), in `namespace`.
pub async fn apply_manifest(
    client: &kube::Client,
    namespace: &str,
    resource: &ApiResource,
    manifest: &serde_json::Value,
) -> Result<DynamicObject, kube::Error> {
    let name = manifest
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .unwrap_or_default()
        .to_owned();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, resource);
    api.patch(
        &name,
        &PatchParams::apply("kubectl").force(),
        &Patch::Apply(manifest),
    )
    .await
}

/// A running `pgwarden-controller` (killed by PID when dropped).
pub struct ControllerProcess {
    pub process: ProcessGuard,
    pub log: PathBuf,
}

impl ControllerProcess {
    /// Starts the controller for `namespace` only, with its election Lease there too, as
    /// [`CONTROLLER_USER`]. Several may run with different `identity`s.
    pub fn start(
        access: &KubeAccess,
        namespace: &str,
        dir: &Path,
        identity: &str,
    ) -> anyhow::Result<ControllerProcess> {
        std::fs::create_dir_all(dir)?;
        let kubeconfig = dir.join(format!("{identity}.kubeconfig"));
        std::fs::write(
            &kubeconfig,
            access.kubeconfig(CONTROLLER_TOKEN, Some(namespace)),
        )?;
        let mut cmd = Command::new(controller_binary());
        cmd.args(["run", "--watch-namespace", namespace])
            .args(["--lease-namespace", namespace])
            .args(["--identity", identity])
            .args(["--lease-duration", "3"])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info,pgwarden_controller=debug");
        let log = dir.join(format!("{identity}.log"));
        let process = ProcessGuard::spawn(identity, cmd, &log)?;
        Ok(ControllerProcess { process, log })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and waits for the exit (the controller's clean stop).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.process.signal(nix::sys::signal::Signal::SIGTERM);
        self.process.wait_exit(Duration::from_secs(20))
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- {} log tail -----\n{}",
                self.process.name(),
                self.process.log_tail(60)
            );
        }
    }
}

/// What the kubelet did, with the holder of the leader Lease at that moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletEvent {
    pub pod: String,
    pub kind: EventKind,
    pub leader: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A new Pod's container was started.
    Started,
    /// A Pod being deleted: its agent was stopped (SIGTERM) and the Pod removed.
    Stopped,
    /// The container's process had exited and was started again in the same Pod.
    Restarted,
}

/// The agent of one Pod.
struct RunningPod {
    uid: String,
    ready: Option<bool>,
}

/// Everything the kubelet knows; the test locks it to reach the members.
pub struct KubeletState {
    /// One member per Pod name (directory, ports, agent process); its etcd is unused.
    pub env: TestEnv,
    pub namespace: String,
    pub cluster: String,
    /// Pods whose exited container is not restarted until the test removes them.
    pub held: HashSet<String>,
    pub events: Vec<KubeletEvent>,
    running: HashMap<String, RunningPod>,
    /// Errors of the last tick per Pod (a Secret not created yet, ...), printed on change.
    last_error: HashMap<String, String>,
    /// A volume shared by every Pod (and by other kubelets given the same directory), like a
    /// network file system mounted at `/`: a posix pgBackRest repository at `/pgbackrest` is
    /// `<volume_root>/pgbackrest` for the agents. `None`: repository paths are left as they are.
    pub volume_root: Option<std::path::PathBuf>,
}

impl KubeletState {
    pub fn member(&self, pod: &str) -> Option<&super::Member> {
        self.env.members.iter().find(|m| m.name == pod)
    }

    pub fn member_mut(&mut self, pod: &str) -> Option<&mut super::Member> {
        self.env.members.iter_mut().find(|m| m.name == pod)
    }
}

/// Plays the kubelet for one cluster's Pods (see the module docs).
pub struct PodKubelet {
    pub state: Arc<Mutex<KubeletState>>,
    task: tokio::task::JoinHandle<()>,
}

impl PodKubelet {
    pub async fn start(
        access: KubeAccess,
        namespace: &str,
        cluster: &str,
    ) -> anyhow::Result<PodKubelet> {
        let env = TestEnv::start(ClusterOptions {
            scope: cluster.to_owned(),
            ..ClusterOptions::default()
        })
        .await?;
        let state = Arc::new(Mutex::new(KubeletState {
            env,
            namespace: namespace.to_owned(),
            cluster: cluster.to_owned(),
            held: HashSet::new(),
            events: Vec::new(),
            running: HashMap::new(),
            last_error: HashMap::new(),
            volume_root: None,
        }));
        let client = access.admin_client().await?;
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                loop {
                    {
                        let mut s = state.lock().await;
                        if let Err(e) = tick(&mut s, &access, &client).await {
                            eprintln!("kubelet: {e:#}");
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        });
        Ok(PodKubelet { state, task })
    }

    pub async fn events(&self) -> Vec<KubeletEvent> {
        self.state.lock().await.events.clone()
    }
}

impl Drop for PodKubelet {
    fn drop(&mut self) {
        self.task.abort();
        if let Ok(mut s) = self.state.try_lock() {
            if std::thread::panicking() {
                eprintln!("----- kubelet events -----\n{:#?}", s.events);
            }
            // Stop the agents now rather than when the runtime drops the task.
            for m in &mut s.env.members {
                m.process = None;
            }
        }
    }
}

fn selector(cluster: &str) -> String {
    format!("application=pgwarden,cluster-name={cluster}")
}

/// The fake IP of a Pod: `10.244.1.<10 + ordinal>` (Endpoints reject loopback addresses).
fn fake_pod_ip(pod: &str) -> String {
    let ordinal: u32 = pod
        .rsplit('-')
        .next()
        .and_then(|o| o.parse().ok())
        .unwrap_or(0);
    format!("10.244.1.{}", 10 + ordinal.min(200))
}

async fn lease_holder(client: &kube::Client, ns: &str, cluster: &str) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt(&format!("{cluster}-leader"))
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

async fn tick(
    s: &mut KubeletState,
    access: &KubeAccess,
    client: &kube::Client,
) -> anyhow::Result<()> {
    let ns = s.namespace.clone();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pods = pods_api
        .list(&ListParams::default().labels(&selector(&s.cluster)))
        .await
        .context("list pods")?;
    let mut seen = HashSet::new();
    for pod in pods.items {
        let name = pod.name_any();
        let uid = pod.uid().unwrap_or_default();
        seen.insert(name.clone());
        let result = pod_tick(s, access, client, &pod, &name, &uid).await;
        match result {
            Ok(()) => {
                s.last_error.remove(&name);
            }
            Err(e) => {
                let text = format!("{e:#}");
                if s.last_error.get(&name) != Some(&text) {
                    eprintln!("kubelet: pod {name}: {text}");
                    s.last_error.insert(name.clone(), text);
                }
            }
        }
    }
    // Pods gone without us (deleted before they were bound, namespace removed): stop them.
    let gone: Vec<String> = s
        .running
        .keys()
        .filter(|n| !seen.contains(*n))
        .cloned()
        .collect();
    for name in gone {
        let leader = lease_holder(client, &ns, &s.cluster).await;
        stop_agent(s, &name).await;
        s.running.remove(&name);
        s.events.push(KubeletEvent {
            pod: name,
            kind: EventKind::Stopped,
            leader,
        });
    }
    Ok(())
}

async fn pod_tick(
    s: &mut KubeletState,
    access: &KubeAccess,
    client: &kube::Client,
    pod: &Pod,
    name: &str,
    uid: &str,
) -> anyhow::Result<()> {
    let ns = s.namespace.clone();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    if pod.metadata.deletion_timestamp.is_some() {
        if s.running.get(name).is_some_and(|r| r.uid == uid) {
            let leader = lease_holder(client, &ns, &s.cluster).await;
            stop_agent(s, name).await;
            s.running.remove(name);
            s.events.push(KubeletEvent {
                pod: name.to_owned(),
                kind: EventKind::Stopped,
                leader,
            });
        }
        // The container is gone: confirm the deletion, as the kubelet does.
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match pods_api.delete(name, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(e).context("remove the deleted pod"),
        }
        return Ok(());
    }
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_none()
    {
        return access.bind_pod(&ns, name).await;
    }
    let ip = fake_pod_ip(name);
    match s.running.get(name).map(|r| r.uid.clone()) {
        Some(running_uid) if running_uid == uid => {
            let member = s.member_mut(name).context("a member for a running pod")?;
            let alive = member.process.as_mut().is_some_and(|p| p.is_running());
            if !alive {
                if s.held.contains(name) {
                    set_ready(s, client, name, &ip, false).await;
                    return Ok(());
                }
                let leader = lease_holder(client, &ns, &s.cluster).await;
                let member = s.member_mut(name).context("member")?;
                member.restart()?;
                s.events.push(KubeletEvent {
                    pod: name.to_owned(),
                    kind: EventKind::Restarted,
                    leader,
                });
                return Ok(());
            }
            let port = member.api_port;
            let ready = tokio::time::timeout(
                Duration::from_secs(2),
                http_request("GET", port, "/readiness", None),
            )
            .await
            .ok()
            .flatten()
            .map(|(code, _)| code)
                == Some(200);
            set_ready(s, client, name, &ip, ready).await;
            Ok(())
        }
        Some(_) => {
            // A new Pod of the same name while we still run the old one's container: the old
            // Pod was removed without a graceful deletion.
            stop_agent(s, name).await;
            s.running.remove(name);
            Ok(())
        }
        None => {
            // The kubelet knows the Pod IP before the containers start.
            set_pod_ready_with(client, &ns, name, &ip, false).await?;
            start_container(s, access, client, pod, name, &ip).await?;
            s.running.insert(
                name.to_owned(),
                RunningPod {
                    uid: uid.to_owned(),
                    ready: Some(false),
                },
            );
            let leader = lease_holder(client, &ns, &s.cluster).await;
            s.events.push(KubeletEvent {
                pod: name.to_owned(),
                kind: EventKind::Started,
                leader,
            });
            Ok(())
        }
    }
}

async fn set_ready(s: &mut KubeletState, client: &kube::Client, name: &str, ip: &str, ready: bool) {
    let ns = s.namespace.clone();
    let Some(r) = s.running.get_mut(name) else {
        return;
    };
    if r.ready != Some(ready)
        && set_pod_ready_with(client, &ns, name, ip, ready)
            .await
            .is_ok()
    {
        r.ready = Some(ready);
    }
}

/// SIGTERM, up to 60 s for the agent's clean stop (it hands over and stops postgres), then the
/// process group is killed.
async fn stop_agent(s: &mut KubeletState, name: &str) {
    let Some(member) = s.member_mut(name) else {
        return;
    };
    if let Some(p) = member.process.as_mut() {
        p.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while p.is_running() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    member.process = None;
}

/// `$(VAR)` expansion as in a container's `env` and `command`: a variable defined earlier is
/// replaced, anything else is left as written.
fn expand(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find(')') {
            Some(end) if vars.contains_key(&after[..end]) => {
                out.push_str(&vars[&after[..end]]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

async fn secret_value(
    client: &kube::Client,
    ns: &str,
    secret: &str,
    key: &str,
) -> anyhow::Result<String> {
    let s = Api::<Secret>::namespaced(client.clone(), ns)
        .get(secret)
        .await
        .with_context(|| format!("read secret {secret}"))?;
    let value = s
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .with_context(|| format!("secret {secret} has no key {key}"))?;
    Ok(String::from_utf8_lossy(&value.0).into_owned())
}

/// The container's environment as the kubelet resolves it.
async fn resolve_env(
    client: &kube::Client,
    ns: &str,
    pod: &str,
    ip: &str,
    container: &Container,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut vars = BTreeMap::new();
    for e in container.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            expand(v, &vars)
        } else if let Some(from) = &e.value_from {
            if let Some(field) = &from.field_ref {
                match field.field_path.as_str() {
                    "metadata.name" => pod.to_owned(),
                    "metadata.namespace" => ns.to_owned(),
                    "status.podIP" => ip.to_owned(),
                    other => anyhow::bail!("env {}: fieldRef {other} is not known", e.name),
                }
            } else if let Some(sel) = &from.secret_key_ref {
                let secret = sel.name.clone().unwrap_or_default();
                secret_value(client, ns, &secret, &sel.key)
                    .await
                    .with_context(|| format!("env {}", e.name))?
            } else {
                anyhow::bail!("env {}: unsupported valueFrom", e.name)
            }
        } else {
            String::new()
        };
        vars.insert(e.name.clone(), value);
    }
    Ok(vars)
}

/// The container's command, `$(VAR)`s expanded.
fn expanded_command(container: &Container, vars: &BTreeMap<String, String>) -> Vec<String> {
    container
        .command
        .iter()
        .flatten()
        .map(|c| expand(c, vars))
        .collect()
}

/// The file the container's command names, read from the ConfigMap volume mounted there.
async fn config_file(
    client: &kube::Client,
    ns: &str,
    pod: &Pod,
    container: &Container,
    vars: &BTreeMap<String, String>,
) -> anyhow::Result<String> {
    let command = expanded_command(container, vars);
    // The agent runs here as a process of its own; in a container, under the image's init.
    anyhow::ensure!(
        command.len() == 4 && command[..3] == ["pgwarden-init", "--", "pgwarden"],
        "the container runs {command:?}, not `pgwarden-init -- pgwarden <config file>`"
    );
    let path = Path::new(&command[3]);
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| path.starts_with(&m.mount_path))
        .with_context(|| format!("no volume is mounted at {}", path.display()))?;
    let key = path
        .strip_prefix(&mount.mount_path)?
        .to_string_lossy()
        .into_owned();
    let volume = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .and_then(|vs| vs.iter().find(|v| v.name == mount.name))
        .with_context(|| format!("no volume {}", mount.name))?;
    let cm_name = volume
        .config_map
        .as_ref()
        .and_then(|c| c.name.clone())
        .with_context(|| format!("volume {} is not a ConfigMap", mount.name))?;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(&cm_name)
        .await
        .with_context(|| format!("read configmap {cm_name}"))?;
    cm.data
        .and_then(|d| d.get(&key).cloned())
        .with_context(|| format!("configmap {cm_name} has no key {key}"))
}

/// The token of the Pod's ServiceAccount (the token controller's Secret).
async fn service_account_token(
    client: &kube::Client,
    ns: &str,
    account: &str,
) -> anyhow::Result<String> {
    let sa = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .get(account)
        .await
        .with_context(|| format!("read serviceaccount {account}"))?;
    let secret = sa
        .secrets
        .iter()
        .flatten()
        .filter_map(|r| r.name.clone())
        .find(|n| n.starts_with(&format!("{account}-token-")))
        .with_context(|| format!("serviceaccount {account} has no token yet"))?;
    secret_value(client, ns, &secret, "token").await
}

async fn start_container(
    s: &mut KubeletState,
    access: &KubeAccess,
    client: &kube::Client,
    pod: &Pod,
    name: &str,
    ip: &str,
) -> anyhow::Result<()> {
    let ns = s.namespace.clone();
    let spec = pod.spec.as_ref().context("pod without spec")?;
    let container = spec.containers.first().context("pod without containers")?;
    let vars = resolve_env(client, &ns, name, ip, container).await?;
    let config_text = config_file(client, &ns, pod, container, &vars).await?;
    let account = spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let token = service_account_token(client, &ns, &account).await?;

    let i = match s.env.members.iter().position(|m| m.name == name) {
        Some(i) => i,
        None => s.env.add_member(name),
    };
    let member = &mut s.env.members[i];
    std::fs::create_dir_all(&member.dir)?;
    member.config = serde_yaml::from_str(&config_text).context("the agent config is YAML")?;
    if let Some(root) = &s.volume_root {
        let repos = member
            .config
            .get_mut("pgbackrest")
            .and_then(|p| p.get_mut("repos"))
            .and_then(|r| r.as_sequence_mut());
        for repo in repos.into_iter().flatten() {
            if repo.get("type").and_then(|t| t.as_str()) == Some("s3") {
                continue;
            }
            if let Some(path) = repo.get("path").and_then(|p| p.as_str()) {
                let mapped = root.join(path.trim_start_matches('/'));
                repo["path"] = serde_yaml::Value::from(mapped.display().to_string());
            }
        }
    }
    map_postgres_binaries(&mut member.config);
    // The agent runs as `postgres`: its own copy of the CA, inside its directory.
    let ca = member.dir.join("kube-ca.crt");
    std::fs::copy(&access.ca_file, &ca).context("copy the apiserver CA")?;
    let kubeconfig = member.dir.join("kubeconfig");
    let pod_access = KubeAccess {
        ca_file: ca,
        ..access.clone()
    };
    std::fs::write(&kubeconfig, pod_access.kubeconfig(&token, None))?;
    let overrides = container_overrides(member, &kubeconfig);
    let mut env = vars.clone();
    env.extend(overrides.clone());
    member.env = env.into_iter().collect();
    if let Some(p) = vars.get("PATRONI_SUPERUSER_PASSWORD") {
        member.superuser_password = p.clone();
    }
    let config_in_container = expanded_command(container, &vars).pop().unwrap_or_default();
    for init in spec.init_containers.iter().flatten() {
        let mut init_env = resolve_env(client, &ns, name, ip, init).await?;
        init_env.extend(overrides.clone());
        let member = &s.env.members[i];
        run_init_container(member, init, &init_env, &config_in_container)
            .with_context(|| format!("init container {}", init.name))?;
    }
    s.env.start_member(i)
}

/// What the test changes in every container of a member: loopback addresses on free ports,
/// the test's data directory, its own pgpass, the apiserver through the Pod's kubeconfig.
fn container_overrides(member: &super::Member, kubeconfig: &Path) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let api = format!("127.0.0.1:{}", member.api_port);
    let pg = format!("127.0.0.1:{}", member.pg_port);
    env.insert("PATRONI_RESTAPI_LISTEN".into(), api.clone());
    env.insert("PATRONI_RESTAPI_CONNECT_ADDRESS".into(), api);
    env.insert("PATRONI_POSTGRESQL_LISTEN".into(), pg.clone());
    env.insert("PATRONI_POSTGRESQL_CONNECT_ADDRESS".into(), pg);
    env.insert(
        "PATRONI_POSTGRESQL_DATA_DIR".into(),
        member.data_dir().display().to_string(),
    );
    // Each container has its own home; on one test host the default `~/pgpass` would be
    // shared by every member of every cluster, each writing its own cluster's password.
    env.insert(
        "PATRONI_POSTGRESQL_PGPASS".into(),
        member.dir.join("pgpass").display().to_string(),
    );
    env.insert("KUBECONFIG".into(), kubeconfig.display().to_string());
    env
}

/// One init container to completion: `pgwarden <args>` as the agent binary, the container's
/// configuration path replaced by the member's file; its output goes to `init-<name>.log` in
/// the member's directory (and into the error when it fails).
fn run_init_container(
    member: &super::Member,
    init: &Container,
    env: &BTreeMap<String, String>,
    config_in_container: &str,
) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let command = expanded_command(init, env);
    let Some((program, args)) = command.split_first() else {
        anyhow::bail!("no command");
    };
    anyhow::ensure!(
        program == "pgwarden",
        "runs {command:?}; this kubelet runs only `pgwarden ...` init containers"
    );
    member.write_config()?;
    let run_as = super::run_as();
    if let Some(who) = &run_as {
        super::chown_tree(&member.dir, who);
    }
    let mut cmd = Command::new(super::agent_binary());
    for arg in args {
        if arg == config_in_container {
            cmd.arg(member.config_path());
        } else {
            cmd.arg(arg);
        }
    }
    cmd.env_remove("PGWARDEN_BIN").envs(env);
    if let Some(who) = &run_as {
        cmd.uid(who.uid).gid(who.gid).env("HOME", &who.home);
    }
    let out = cmd.output().context("run the agent binary")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let log = member.dir.join(format!("init-{}.log", init.name));
    let mut all = std::fs::read_to_string(&log).unwrap_or_default();
    all.push_str(&text);
    std::fs::write(&log, all)?;
    anyhow::ensure!(
        out.status.success(),
        "exited {:?}: {}",
        out.status.code(),
        text.trim()
    );
    Ok(())
}

/// The image's `/usr/lib/postgresql/<v>/bin` in `postgresql.bin_dir` and `bin_dirs`, as the
/// host has them: 17 where `scripts/build-postgres17.sh` put it. An image with 17 carries a
/// pgBackRest that knows 17 (bookworm's 2.45 does not): the script's trixie one.
fn map_postgres_binaries(config: &mut serde_yaml::Value) {
    let image_17 = "/usr/lib/postgresql/17/bin";
    let host = |path: &str| -> Option<String> {
        if path != image_17 || Path::new(path).join("postgres").is_file() {
            return None;
        }
        super::pg17_bin_dir().map(|d| d.display().to_string())
    };
    let mut mapped_17 = false;
    if let Some(pg) = config.get_mut("postgresql") {
        if let Some(mapped) = pg.get("bin_dir").and_then(|b| b.as_str()).and_then(host) {
            pg["bin_dir"] = serde_yaml::Value::from(mapped);
            mapped_17 = true;
        }
        if let Some(dirs) = pg.get_mut("bin_dirs").and_then(|d| d.as_mapping_mut()) {
            for (_, dir) in dirs.iter_mut() {
                if let Some(mapped) = dir.as_str().and_then(host) {
                    *dir = serde_yaml::Value::from(mapped);
                    mapped_17 = true;
                }
            }
        }
    }
    let pgbackrest_17 = super::pg17_pgbackrest();
    if let (true, Some(command), Some(section)) = (
        mapped_17,
        pgbackrest_17,
        config.get_mut("pgbackrest").filter(|p| p.is_mapping()),
    ) {
        section["command"] = serde_yaml::Value::from(command.display().to_string());
    }
}
