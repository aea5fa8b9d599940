//! A real Kubernetes control plane for tests: etcd + kube-apiserver v1.20 (+ optionally
//! kube-controller-manager), on free loopback ports, and a "kubelet" that turns Pods into agent
//! processes.
//!
//! The binaries are built once by `scripts/build-kube.sh` (the test command runs it) into
//! [`KUBE_BIN_DIR`]; `PGWARDEN_KUBE_BIN_DIR` overrides the directory.
//!
//! # What runs
//! - `kube-apiserver` with TLS (a self-signed certificate from `--cert-dir`), static tokens
//!   (`--token-auth-file`): [`ADMIN_TOKEN`] (group `system:masters`) and [`AGENT_TOKEN`] (user
//!   [`AGENT_USER`], no groups), `--authorization-mode=RBAC`, service-account keys generated at
//!   start, the `ServiceAccount` admission plugin off (no token controller is needed to create
//!   Pods) and the `kubernetes` Service endpoint reconciler off (its endpoint would be a loopback
//!   address, which Endpoints reject).
//! - `kube-controller-manager` (with [`KubeOptions::controller_manager`]): the endpoint,
//!   StatefulSet, ReplicaSet, Deployment, garbage-collector, namespace and service-account
//!   controllers. There is no scheduler and no kubelet: [`KubeAccess::create_pod`] binds Pods to
//!   a Node object [`TEST_NODE`] that nothing runs (Pods a StatefulSet creates stay unscheduled
//!   unless the test binds them), and a test plays the kubelet ([`KubeMembers`], [`KubeAccess::set_pod_ready`]).
//!
//! # Sharing
//! Starting the apiserver costs about 6 s, so a test binary normally shares one
//! ([`KubeCluster::shared`]) and gives each test its own namespace
//! ([`KubeAccess::create_namespace`]). A test that freezes or stops the apiserver must own one
//! ([`KubeCluster::start`]). The shared processes are started from a thread that lives as long
//! as the test process and carry a parent-death signal, so they end with the test binary.
//!
//! # Reuse
//! [`KubeAccess`] is a plain value (URL, CA file, tokens) that can be cloned into any test and
//! any tokio runtime: [`KubeAccess::admin_client`], [`KubeAccess::client`] (any token),
//! [`KubeAccess::kubeconfig`] (YAML for a process), [`KubeAccess::create_namespace`],
//! [`KubeAccess::bind_agent_role`] (the Role in `deploy/agent-rbac.yaml`),
//! [`KubeAccess::create_pod`], [`KubeAccess::bind_pod`], [`KubeAccess::set_pod_ready`]; and
//! [`super::kubelet::KubeMembers`] for agents in Pods.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde::Deserialize as _;
use serde_json::json;

use super::etcd::Etcd;
use super::ports::free_port;
use super::process::ProcessGuard;
use super::wait_until;

/// Where `scripts/build-kube.sh` installs the binaries.
pub const KUBE_BIN_DIR: &str = "/var/cache/pgwarden/kubernetes-1.20/bin";
/// Bearer token of a cluster administrator (`system:masters`, bypasses RBAC).
pub const ADMIN_TOKEN: &str = "pgwarden-test-admin-token";
/// Bearer token of [`AGENT_USER`], which only the Role bound by
/// [`KubeAccess::bind_agent_role`] authorizes.
pub const AGENT_TOKEN: &str = "pgwarden-test-agent-token";
pub const AGENT_USER: &str = "pgwarden-agent";
/// Bearer token of [`CONTROLLER_USER`], which only the ClusterRole of `deploy/controller.yaml`
/// authorizes (bound per namespace by `operator::bind_controller_role`).
pub const CONTROLLER_TOKEN: &str = "pgwarden-test-controller-token";
pub const CONTROLLER_USER: &str = "pgwarden-controller";
/// The Node that test Pods are bound to (a Node object only: nothing runs it, and the node
/// lifecycle and pod GC controllers are not started, so it is never marked unreachable).
pub const TEST_NODE: &str = "pgwarden-test-node";
/// The Role and binding name created in each test namespace.
pub const AGENT_ROLE: &str = "pgwarden-agent";

/// The directory holding `kube-apiserver` and `kube-controller-manager`.
pub fn kube_bin_dir() -> PathBuf {
    std::env::var_os("PGWARDEN_KUBE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(KUBE_BIN_DIR))
}

/// What to start.
#[derive(Debug, Clone, Copy, Default)]
pub struct KubeOptions {
    /// Also run kube-controller-manager (Endpoints of Services, StatefulSets → Pods, garbage
    /// collection of owned objects).
    pub controller_manager: bool,
}

/// How to reach a running apiserver; cheap to clone, valid in any runtime.
#[derive(Debug, Clone)]
pub struct KubeAccess {
    /// `https://127.0.0.1:<port>`.
    pub base_url: String,
    /// PEM file the apiserver's certificate chains to (the self-signed CA from `--cert-dir`).
    pub ca_file: PathBuf,
}

/// A running control plane that this value owns: dropping it stops every process.
pub struct KubeCluster {
    pub access: KubeAccess,
    pub dir: PathBuf,
    pub etcd: Etcd,
    pub apiserver: ProcessGuard,
    pub controller_manager: Option<ProcessGuard>,
    /// Removes `dir` on drop (unless `PGWARDEN_KEEP_TEST_DIRS` is set).
    _tempdir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for KubeCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCluster")
            .field("base_url", &self.access.base_url)
            .field("apiserver_pid", &self.apiserver.pid())
            .finish()
    }
}

impl KubeCluster {
    /// Starts etcd, kube-apiserver (and kube-controller-manager) in a new temporary directory
    /// and waits until the apiserver is ready.
    pub async fn start(options: KubeOptions) -> anyhow::Result<KubeCluster> {
        let tempdir = tempfile::Builder::new().prefix("pgw-kube").tempdir()?;
        let dir = tempdir.path().to_owned();
        let mut cluster = Self::start_in(&dir, options, false).await?;
        cluster._tempdir = Some(tempdir);
        Ok(cluster)
    }

    /// The control plane shared by every test of this test binary (with the controller
    /// manager), started on first use. Its processes end with the test process.
    pub fn shared() -> KubeAccess {
        static SHARED: OnceLock<Result<KubeAccess, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                let (tx, rx) = std::sync::mpsc::channel();
                // The processes get a parent-death signal, which fires when the *thread* that
                // forked them ends: so they are started from a thread that never ends.
                std::thread::spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let started = runtime.block_on(async {
                        super::remove_dirs_of_gone_processes("pgw-kube-shared-");
                        let dir = std::env::temp_dir()
                            .join(format!("pgw-kube-shared-{}", std::process::id()));
                        std::fs::create_dir_all(&dir)?;
                        Self::start_in(
                            &dir,
                            KubeOptions {
                                controller_manager: true,
                            },
                            true,
                        )
                        .await
                    });
                    match started {
                        Ok(cluster) => {
                            let _ = tx.send(Ok(cluster.access.clone()));
                            // Keep the guards (and this thread) alive until the process exits.
                            loop {
                                std::thread::park();
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(format!("{e:#}")));
                        }
                    }
                });
                rx.recv()
                    .unwrap_or_else(|e| Err(format!("the kube starter thread died: {e}")))
            })
            .clone()
            .unwrap_or_else(|e| panic!("cannot start the shared kube-apiserver: {e}"))
    }

    async fn start_in(dir: &Path, options: KubeOptions, tied: bool) -> anyhow::Result<Self> {
        let bin = kube_bin_dir();
        let apiserver_bin = bin.join("kube-apiserver");
        anyhow::ensure!(
            apiserver_bin.is_file(),
            "{} is missing: run scripts/build-kube.sh (the test command does)",
            apiserver_bin.display()
        );
        let etcd = if tied {
            Etcd::start_with(dir, die_with_parent).await?
        } else {
            Etcd::start(dir).await?
        };

        let sa_key = dir.join("sa.key");
        let out = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&sa_key)
            .arg("2048")
            .output()
            .context("run openssl to generate the service-account key")?;
        anyhow::ensure!(
            out.status.success(),
            "openssl genrsa failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(
            dir.join("tokens.csv"),
            format!(
                "{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n{AGENT_TOKEN},{AGENT_USER},agent-uid\n{CONTROLLER_TOKEN},{CONTROLLER_USER},controller-uid\n"
            ),
        )?;
        let cert_dir = dir.join("certs");
        let port = free_port();
        let mut cmd = Command::new(&apiserver_bin);
        cmd.arg(format!("--etcd-servers=http://{}", etcd.endpoint()))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg("--insecure-port=0")
            .arg(format!("--cert-dir={}", cert_dir.display()))
            .arg(format!(
                "--token-auth-file={}",
                dir.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", sa_key.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_key.display()
            ))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--endpoint-reconciler-type=none")
            .arg("--enable-priority-and-fairness=false")
            .arg("--profiling=false")
            .arg("--logtostderr=true")
            .arg("--v=0");
        if tied {
            die_with_parent(&mut cmd);
        }
        let apiserver = ProcessGuard::spawn("kube-apiserver", cmd, &dir.join("apiserver.log"))?;
        let access = KubeAccess {
            base_url: format!("https://127.0.0.1:{port}"),
            ca_file: cert_dir.join("apiserver.crt"),
        };
        let ready_url = format!("{}/readyz", access.base_url);
        wait_until("kube-apiserver is ready", Duration::from_secs(90), || {
            let url = ready_url.clone();
            async move { curl_ok(&url).await }
        })
        .await;

        let controller_manager = if options.controller_manager {
            let kubeconfig = dir.join("admin.kubeconfig");
            std::fs::write(&kubeconfig, access.kubeconfig(ADMIN_TOKEN, None))?;
            let mut cmd = Command::new(bin.join("kube-controller-manager"));
            cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
                .arg(format!(
                    "--service-account-private-key-file={}",
                    sa_key.display()
                ))
                .arg(format!("--root-ca-file={}", access.ca_file.display()))
                .arg("--controllers=endpoint,endpointslice,statefulset,replicaset,deployment,garbagecollector,namespace,serviceaccount,serviceaccount-token")
                .arg("--leader-elect=false")
                .arg("--port=0")
                .arg("--secure-port=0")
                .arg("--profiling=false")
                .arg("--logtostderr=true")
                .arg("--v=0");
            if tied {
                die_with_parent(&mut cmd);
            }
            Some(ProcessGuard::spawn(
                "kube-controller-manager",
                cmd,
                &dir.join("controller-manager.log"),
            )?)
        } else {
            None
        };
        Ok(KubeCluster {
            access,
            dir: dir.to_owned(),
            etcd,
            apiserver,
            controller_manager,
            _tempdir: None,
        })
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- kube-apiserver log tail -----\n{}",
                self.apiserver.log_tail(30)
            );
        }
        if std::env::var_os("PGWARDEN_KEEP_TEST_DIRS").is_some() {
            if let Some(t) = self._tempdir.take() {
                eprintln!("kept the kube directory {}", t.keep().display());
            }
        }
    }
}

/// Makes `cmd`'s process receive SIGKILL when the thread that spawns it ends.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)?;
            if nix::unistd::getppid() != parent {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// `GET url` with the admin token answers 200.
async fn curl_ok(url: &str) -> bool {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sk",
            "--max-time",
            "3",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("-H")
        .arg(format!("Authorization: Bearer {ADMIN_TOKEN}"))
        .arg(url)
        .output()
        .await;
    matches!(out, Ok(o) if o.stdout == b"200")
}

impl KubeAccess {
    /// A kubeconfig for `token` (with `namespace` as the context's default, if given).
    pub fn kubeconfig(&self, token: &str, namespace: Option<&str>) -> String {
        let ns = namespace
            .map(|n| format!("\n    namespace: {n}"))
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\nusers:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: user{ns}\ncurrent-context: test\n",
            url = self.base_url,
            ca = self.ca_file.display(),
        )
    }

    /// A client authenticated by `token`.
    pub async fn client(&self, token: &str) -> anyhow::Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig(token, None))?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A cluster-admin client.
    pub async fn admin_client(&self) -> anyhow::Result<kube::Client> {
        self.client(ADMIN_TOKEN).await
    }

    /// Creates a namespace named `<prefix>-<unique suffix>` and returns its name.
    pub async fn create_namespace(&self, prefix: &str) -> anyhow::Result<String> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let api: Api<Namespace> = Api::all(self.admin_client().await?);
        api.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}}))?,
        )
        .await
        .with_context(|| format!("create namespace {name}"))?;
        Ok(name)
    }

    /// Creates the agent Role from `deploy/agent-rbac.yaml` in `namespace` and binds it to
    /// [`AGENT_USER`].
    pub async fn bind_agent_role(&self, namespace: &str) -> anyhow::Result<()> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent-rbac.yaml");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let mut role: Option<Role> = None;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc)?;
            if value.get("kind").and_then(|k| k.as_str()) == Some("Role") {
                role = Some(serde_yaml::from_value(value)?);
            }
        }
        let mut role = role.context("deploy/agent-rbac.yaml has no Role")?;
        role.metadata.name = Some(AGENT_ROLE.to_owned());
        role.metadata.namespace = Some(namespace.to_owned());
        let client = self.admin_client().await?;
        Api::<Role>::namespaced(client.clone(), namespace)
            .create(&PostParams::default(), &role)
            .await
            .context("create the agent Role")?;
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": AGENT_ROLE, "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": AGENT_ROLE},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": AGENT_USER}],
        }))?;
        Api::<RoleBinding>::namespaced(client, namespace)
            .create(&PostParams::default(), &binding)
            .await
            .context("bind the agent Role")?;
        Ok(())
    }

    /// Creates [`TEST_NODE`] if it does not exist yet.
    pub async fn ensure_node(&self) -> anyhow::Result<()> {
        let api: Api<Node> = Api::all(self.admin_client().await?);
        let node: Node = serde_json::from_value(json!({"metadata": {"name": TEST_NODE}}))?;
        match api.create(&PostParams::default(), &node).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e).context("create the test Node"),
        }
    }

    /// Creates a Pod with one placeholder container and `labels`, bound to [`TEST_NODE`] (the
    /// endpoint controllers need a node name; no scheduler or kubelet runs).
    pub async fn create_pod(
        &self,
        namespace: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> anyhow::Result<Pod> {
        self.ensure_node().await?;
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": TEST_NODE, "containers": [{"name": "postgres", "image": "pgwarden:test",
                "ports": [{"name": "postgresql", "containerPort": 5432}]}]},
        }))?;
        let api: Api<Pod> = Api::namespaced(self.admin_client().await?, namespace);
        Ok(api.create(&PostParams::default(), &pod).await?)
    }

    /// Binds an unscheduled Pod (for example one a StatefulSet created) to [`TEST_NODE`], as
    /// the scheduler would.
    pub async fn bind_pod(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        self.ensure_node().await?;
        let binding = serde_json::to_vec(&json!({
            "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": TEST_NODE},
        }))?;
        let api: Api<Pod> = Api::namespaced(self.admin_client().await?, namespace);
        api.create_subresource::<serde_json::Value>(
            "binding",
            name,
            &PostParams::default(),
            binding,
        )
        .await
        .with_context(|| format!("bind pod {name}"))?;
        Ok(())
    }

    /// Sets the Pod's status as a kubelet would: `Running`, `pod_ip`, and the `Ready`
    /// condition. The endpoint controller lists Ready Pods as a Service's addresses. (Endpoints
    /// reject loopback addresses, so pass a fake routable one such as `10.244.0.1`.)
    pub async fn set_pod_ready(
        &self,
        namespace: &str,
        name: &str,
        pod_ip: &str,
        ready: bool,
    ) -> anyhow::Result<()> {
        let client = self.admin_client().await?;
        set_pod_ready_with(&client, namespace, name, pod_ip, ready).await
    }
}

/// [`KubeAccess::set_pod_ready`] with an existing client.
pub async fn set_pod_ready_with(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    pod_ip: &str,
    ready: bool,
) -> anyhow::Result<()> {
    let status = if ready { "True" } else { "False" };
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let patch = json!({"status": {
        "phase": "Running",
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "conditions": [
            {"type": "Ready", "status": status, "lastTransitionTime": now},
            {"type": "ContainersReady", "status": status, "lastTransitionTime": now},
        ],
    }});
    Api::<Pod>::namespaced(client.clone(), namespace)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("patch the status of pod {name}"))?;
    Ok(())
}
