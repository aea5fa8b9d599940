//! The kubelet's part for the controller's PgBouncer poolers, and kube-proxy's for Services.
//!
//! [`PoolerKubelet`] runs the Pods of every pooler Deployment of a namespace (label
//! `pgwarden.io/pooler`) as real processes, every 250 ms:
//! - binds an unscheduled Pod to the test node;
//! - starts its container's command, which must be `pgwarden-init [--reload-on-change FILE]...
//!   -- pgbouncer INI`: the files of the projected volume mounted at the command's paths (the
//!   ConfigMap's `pgbouncer.ini`, the Secret's `userlist.txt`) are written into a directory of
//!   the Pod as the kubelet writes a volume (a `..data` symlink to a versioned directory, each
//!   file a symlink through it), and the paths under the mount point are that directory. What
//!   the test must change, and only that, is rewritten in the ini: `listen_addr`/`listen_port`
//!   (loopback, a free port) and each `[databases]` entry's `host=`/`port=`, which name a Service
//!   (`<service>.<namespace>.svc`): they become a [`ServiceProxy`] for it;
//! - keeps the volume up to date: a changed ConfigMap or Secret is written as a new version and
//!   the `..data` symlink swapped, so `pgwarden-init` sees the change as in a real Pod and sends
//!   PgBouncer SIGHUP;
//! - sets the Pod `Ready` while PgBouncer accepts TCP connections (the tcpSocket probe);
//! - for a Pod being deleted: SIGTERM (the init forwards it), then removes the Pod.
//!
//! [`ServiceProxy`] plays kube-proxy: a loopback listener for one Service that sends each new
//! connection to a ready address of the Service's Endpoints (the endpoint controller's view of
//! the role labels), the Pod found by the address's `targetRef` (a member's postgres port, or a
//! pooler Pod's PgBouncer port). As with kube-proxy, an open connection stays where it was
//! sent when the Endpoints change.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Preconditions};
use kube::ResourceExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use super::kube::{set_pod_ready_with, KubeAccess};
use super::operator::KubeletState;
use super::ports::free_port;
use super::process::{children_of, ProcessGuard};
use super::{agent_binary, chown_tree, run_as, set_mode};

/// The label the controller puts on pooler Pods.
pub const POOLER_LABEL: &str = "pgwarden.io/pooler";

/// Loopback port of each Pod the proxies may send connections to: members and pooler Pods.
type PodPorts = Arc<std::sync::Mutex<HashMap<String, u16>>>;

/// Forwards `127.0.0.1:port` to the ready Pods of a Service (see the module docs).
pub struct ServiceProxy {
    pub service: String,
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ServiceProxy {
    async fn start(
        client: kube::Client,
        namespace: &str,
        service: &str,
        ports: PodPorts,
    ) -> anyhow::Result<ServiceProxy> {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let endpoints: Api<Endpoints> = Api::namespaced(client, namespace);
        let name = service.to_owned();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let endpoints = endpoints.clone();
                let name = name.clone();
                let ports = ports.clone();
                tokio::spawn(async move {
                    // No ready endpoint: the connection is closed, as kube-proxy rejects it.
                    let Some(target) = ready_pod_port(&endpoints, &name, &ports).await else {
                        return;
                    };
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Ok(ServiceProxy {
            service: service.to_owned(),
            port,
            task,
        })
    }
}

/// The loopback port of the first ready address of `service`'s Endpoints.
async fn ready_pod_port(
    endpoints: &Api<Endpoints>,
    service: &str,
    ports: &PodPorts,
) -> Option<u16> {
    let ep = endpoints.get_opt(service).await.ok().flatten()?;
    let pods: Vec<String> = ep
        .subsets
        .unwrap_or_default()
        .into_iter()
        .flat_map(|s| s.addresses.unwrap_or_default())
        .filter_map(|a| a.target_ref.and_then(|r| r.name))
        .collect();
    let ports = ports.lock().unwrap_or_else(|e| e.into_inner());
    pods.iter().find_map(|p| ports.get(p).copied())
}

/// One pooler Pod's PgBouncer.
pub struct PoolerPod {
    pub uid: String,
    /// The pooler (Deployment) it belongs to: its `pgwarden.io/pooler` label.
    pub pooler: String,
    /// Where PgBouncer listens on loopback.
    pub port: u16,
    pub dir: PathBuf,
    /// `pgwarden-init`, whose child is PgBouncer.
    pub process: ProcessGuard,
    /// The volume's files as last written (name → content).
    files: BTreeMap<String, String>,
    version: u32,
    ready: Option<bool>,
    ip: String,
}

impl PoolerPod {
    /// PgBouncer's PID (the init's child).
    pub fn pgbouncer_pid(&self) -> Option<i32> {
        children_of(self.process.pid()).first().copied()
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    fn stop(&mut self) {
        let pgbouncer = children_of(self.process.pid());
        self.process.signal(nix::sys::signal::Signal::SIGTERM);
        if self.process.wait_exit(Duration::from_secs(10)).is_none() {
            // PgBouncer runs in a process group of its own (the init's doing): kill it by PID.
            for pid in pgbouncer {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for PoolerPod {
    fn drop(&mut self) {
        if self.process.is_running() {
            self.stop();
        }
    }
}

/// Everything the pooler kubelet knows; a test locks it to find Pods and proxies.
pub struct PoolerState {
    pub namespace: String,
    dir: PathBuf,
    pub pods: BTreeMap<String, PoolerPod>,
    /// One proxy per Service name, made on first use.
    proxies: HashMap<String, ServiceProxy>,
    ports: PodPorts,
    members: Arc<Mutex<KubeletState>>,
    client: kube::Client,
    next_ip: u32,
    last_error: HashMap<String, String>,
    /// Removes `dir` on drop.
    _tempdir: tempfile::TempDir,
}

impl PoolerState {
    /// The loopback port of a proxy for `service` (started now if there is none yet): the
    /// address a client in the cluster would use for the Service.
    pub async fn service_port(&mut self, service: &str) -> anyhow::Result<u16> {
        if let Some(p) = self.proxies.get(service) {
            return Ok(p.port);
        }
        let proxy = ServiceProxy::start(
            self.client.clone(),
            &self.namespace,
            service,
            self.ports.clone(),
        )
        .await?;
        let port = proxy.port;
        self.proxies.insert(service.to_owned(), proxy);
        Ok(port)
    }
}

/// Runs the pooler Pods of one namespace (see the module docs).
pub struct PoolerKubelet {
    pub state: Arc<Mutex<PoolerState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PoolerKubelet {
    fn drop(&mut self) {
        self.task.abort();
        if let Ok(mut s) = self.state.try_lock() {
            if std::thread::panicking() {
                for (name, pod) in &s.pods {
                    eprintln!(
                        "----- pooler pod {name} log tail -----\n{}",
                        pod.process.log_tail(30)
                    );
                }
            }
            s.pods.clear();
        }
    }
}

impl PoolerKubelet {
    /// `members` is the member kubelet of the cluster(s) whose Services the poolers use.
    pub async fn start(
        access: KubeAccess,
        namespace: &str,
        members: Arc<Mutex<KubeletState>>,
    ) -> anyhow::Result<PoolerKubelet> {
        let client = access.admin_client().await?;
        let tempdir = tempfile::Builder::new().prefix("pgw-pooler").tempdir()?;
        let dir = tempdir.path().to_owned();
        set_mode(&dir, 0o755);
        let state = Arc::new(Mutex::new(PoolerState {
            namespace: namespace.to_owned(),
            dir,
            pods: BTreeMap::new(),
            proxies: HashMap::new(),
            ports: Arc::new(std::sync::Mutex::new(HashMap::new())),
            members,
            client: client.clone(),
            next_ip: 10,
            last_error: HashMap::new(),
            _tempdir: tempdir,
        }));
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                loop {
                    {
                        let mut s = state.lock().await;
                        if let Err(e) = tick(&mut s, &access, &client).await {
                            eprintln!("pooler kubelet: {e:#}");
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        });
        Ok(PoolerKubelet { state, task })
    }
}

async fn tick(
    s: &mut PoolerState,
    access: &KubeAccess,
    client: &kube::Client,
) -> anyhow::Result<()> {
    // The members' postgres ports, for the proxies (a member's port never changes).
    {
        let members = s.members.lock().await;
        let mut ports = s.ports.lock().unwrap_or_else(|e| e.into_inner());
        for m in &members.env.members {
            ports.insert(m.name.clone(), m.pg_port);
        }
    }
    let ns = s.namespace.clone();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pods = pods_api
        .list(&ListParams::default().labels(POOLER_LABEL))
        .await
        .context("list pooler pods")?;
    let mut seen = Vec::new();
    for pod in pods.items {
        let name = pod.name_any();
        seen.push(name.clone());
        match pod_tick(s, access, client, &pod, &name).await {
            Ok(()) => {
                s.last_error.remove(&name);
            }
            Err(e) => {
                let text = format!("{e:#}");
                if s.last_error.get(&name) != Some(&text) {
                    eprintln!("pooler kubelet: pod {name}: {text}");
                    s.last_error.insert(name, text);
                }
            }
        }
    }
    let gone: Vec<String> = s
        .pods
        .keys()
        .filter(|n| !seen.contains(n))
        .cloned()
        .collect();
    for name in gone {
        if let Some(mut pod) = s.pods.remove(&name) {
            pod.stop();
        }
        s.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&name);
    }
    Ok(())
}

async fn pod_tick(
    s: &mut PoolerState,
    access: &KubeAccess,
    client: &kube::Client,
    pod: &Pod,
    name: &str,
) -> anyhow::Result<()> {
    let ns = s.namespace.clone();
    let uid = pod.uid().unwrap_or_default();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    if pod.metadata.deletion_timestamp.is_some() {
        if let Some(mut running) = s.pods.remove(name) {
            running.stop();
            s.ports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(name);
        }
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid),
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
    let volume = volume_files(client, &ns, pod).await?;
    let hosts = s_proxies_ports(s, &volume.files).await?;
    match s.pods.get_mut(name) {
        Some(running) if running.uid == uid => {
            if !running.process.is_running() {
                // The kubelet restarts an exited container.
                running.process = spawn(&running.dir, &volume, name)?;
            }
            let wanted = rewrite_files(hosts, running.port, &volume, &running.dir);
            if wanted != running.files {
                running.version += 1;
                write_volume(&running.dir, running.version, &wanted)?;
                running.files = wanted;
            }
            let ready = TcpStream::connect(("127.0.0.1", running.port))
                .await
                .is_ok();
            if running.ready != Some(ready)
                && set_pod_ready_with(client, &ns, name, &running.ip, ready)
                    .await
                    .is_ok()
            {
                running.ready = Some(ready);
            }
            Ok(())
        }
        Some(_) => {
            // A new Pod of the same name: the old one was removed without us.
            if let Some(mut old) = s.pods.remove(name) {
                old.stop();
            }
            Ok(())
        }
        None => {
            let ip = format!("10.244.2.{}", s.next_ip);
            s.next_ip += 1;
            set_pod_ready_with(client, &ns, name, &ip, false).await?;
            let port = free_port();
            let dir = s.dir.join(name);
            std::fs::create_dir_all(&dir)?;
            let files = rewrite_files(hosts, port, &volume, &dir);
            write_volume(&dir, 1, &files)?;
            let log = dir.join("pgbouncer.log");
            std::fs::File::create(&log)?;
            if let Some(who) = run_as() {
                chown_tree(&dir, &who);
            }
            let process = spawn(&dir, &volume, name)?;
            let pooler = pod.labels().get(POOLER_LABEL).cloned().unwrap_or_default();
            s.ports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_owned(), port);
            s.pods.insert(
                name.to_owned(),
                PoolerPod {
                    uid,
                    pooler,
                    port,
                    dir,
                    process,
                    files,
                    version: 1,
                    ready: Some(false),
                    ip,
                },
            );
            Ok(())
        }
    }
}

/// The proxy port of every Service the ini files name (`host=<service>.<ns>.svc`).
async fn s_proxies_ports(
    s: &mut PoolerState,
    files: &BTreeMap<String, String>,
) -> anyhow::Result<HashMap<String, u16>> {
    let mut out = HashMap::new();
    for text in files.values() {
        for host in database_hosts(text) {
            let service = host.split('.').next().unwrap_or_default().to_owned();
            let port = s.service_port(&service).await?;
            out.insert(host, port);
        }
    }
    Ok(out)
}

/// The `host=` of each `[databases]` entry.
fn database_hosts(ini: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_databases = false;
    for line in ini.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_databases = line == "[databases]";
            continue;
        }
        if !in_databases || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some((_, value)) = line.split_once('=') {
            for token in value.split_whitespace() {
                if let Some(host) = token.strip_prefix("host=") {
                    out.push(host.to_owned());
                }
            }
        }
    }
    out
}

/// The Pod's command and the files of the volume mounted at its paths, as the Pod spec and the
/// ConfigMap and Secret say.
struct VolumeView {
    command: Vec<String>,
    /// Where the volume is mounted in the container.
    mount_path: String,
    /// File name in the volume → content.
    files: BTreeMap<String, String>,
}

async fn volume_files(client: &kube::Client, ns: &str, pod: &Pod) -> anyhow::Result<VolumeView> {
    let spec = pod.spec.as_ref().context("pod without spec")?;
    let container = spec.containers.first().context("pod without containers")?;
    let command = container.command.clone().unwrap_or_default();
    let dd = command
        .iter()
        .position(|c| c == "--")
        .context("no `--` in the command")?;
    anyhow::ensure!(
        command.first().map(String::as_str) == Some("pgwarden-init")
            && command.get(dd + 1).map(String::as_str) == Some("pgbouncer")
            && command.len() == dd + 3,
        "the container runs {command:?}, not `pgwarden-init ... -- pgbouncer <ini>`"
    );
    let ini = Path::new(&command[dd + 2]);
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| ini.starts_with(&m.mount_path))
        .with_context(|| format!("no volume is mounted at {}", ini.display()))?;
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .with_context(|| format!("no volume {}", mount.name))?;
    let sources = volume
        .projected
        .as_ref()
        .and_then(|p| p.sources.clone())
        .with_context(|| format!("volume {} is not a projected volume", mount.name))?;
    let mut files = BTreeMap::new();
    for source in sources {
        if let Some(cm) = source.config_map {
            let name = cm.name.clone().unwrap_or_default();
            let data = Api::<ConfigMap>::namespaced(client.clone(), ns)
                .get(&name)
                .await
                .with_context(|| format!("read configmap {name}"))?
                .data
                .unwrap_or_default();
            for item in cm.items.unwrap_or_default() {
                let value = data
                    .get(&item.key)
                    .with_context(|| format!("configmap {name} has no key {}", item.key))?;
                files.insert(item.path, value.clone());
            }
        }
        if let Some(secret) = source.secret {
            let name = secret.name.clone().unwrap_or_default();
            let data = Api::<Secret>::namespaced(client.clone(), ns)
                .get(&name)
                .await
                .with_context(|| format!("read secret {name}"))?
                .data
                .unwrap_or_default();
            for item in secret.items.unwrap_or_default() {
                let value = data
                    .get(&item.key)
                    .with_context(|| format!("secret {name} has no key {}", item.key))?;
                files.insert(item.path, String::from_utf8_lossy(&value.0).into_owned());
            }
        }
    }
    Ok(VolumeView {
        command,
        mount_path: mount.mount_path.trim_end_matches('/').to_owned(),
        files,
    })
}

/// The volume's files with what the test changes: the mount point is `dir` on this host, the
/// listen address loopback on `port`, each `[databases]` host its Service's proxy.
fn rewrite_files(
    proxies: HashMap<String, u16>,
    port: u16,
    volume: &VolumeView,
    dir: &Path,
) -> BTreeMap<String, String> {
    let local = dir.join("volume");
    let mut out = BTreeMap::new();
    for (name, text) in &volume.files {
        if !name.ends_with(".ini") {
            out.insert(name.clone(), text.clone());
            continue;
        }
        let mut lines = Vec::new();
        for line in text.lines() {
            let key = line.split('=').next().unwrap_or_default().trim();
            let line = match key {
                "listen_addr" => "listen_addr = 127.0.0.1".to_owned(),
                "listen_port" => format!("listen_port = {port}"),
                _ => {
                    let mut l = line.replace(
                        &format!("{}/", volume.mount_path),
                        &format!("{}/", local.display()),
                    );
                    for (host, proxy) in &proxies {
                        if l.split_whitespace().any(|t| t == format!("host={host}")) {
                            l = l
                                .split_whitespace()
                                .map(|t| {
                                    if t.starts_with("host=") {
                                        "host=127.0.0.1".to_owned()
                                    } else if t.starts_with("port=") {
                                        format!("port={proxy}")
                                    } else {
                                        t.to_owned()
                                    }
                                })
                                .collect::<Vec<_>>()
                                .join(" ");
                        }
                    }
                    l
                }
            };
            lines.push(line);
        }
        out.insert(name.clone(), lines.join("\n") + "\n");
    }
    out
}

/// Writes the files as the kubelet's atomic writer does: `volume/..v<N>/<file>`, the symlink
/// `volume/..data` swapped to it by a rename, and `volume/<file>` → `..data/<file>`.
fn write_volume(dir: &Path, version: u32, files: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let volume = dir.join("volume");
    std::fs::create_dir_all(&volume)?;
    let versioned = volume.join(format!("..v{version}"));
    std::fs::create_dir_all(&versioned)?;
    for (name, text) in files {
        std::fs::write(versioned.join(name), text)?;
    }
    let tmp = volume.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..v{version}"), &tmp)?;
    std::fs::rename(&tmp, volume.join("..data"))?;
    for name in files.keys() {
        let link = volume.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link)?;
        }
    }
    if let Some(who) = run_as() {
        chown_tree(&volume, &who);
    }
    Ok(())
}

/// Starts the container's command with the mount point mapped to the Pod's directory.
fn spawn(dir: &Path, volume: &VolumeView, name: &str) -> anyhow::Result<ProcessGuard> {
    use std::os::unix::process::CommandExt;
    let local = dir.join("volume");
    let map = |arg: &String| {
        arg.replace(
            &format!("{}/", volume.mount_path),
            &format!("{}/", local.display()),
        )
    };
    let init = agent_binary().with_file_name("pgwarden-init");
    let mut cmd = Command::new(&init);
    cmd.args(volume.command[1..].iter().map(map))
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("PGWARDEN_INIT_GRACE", "5")
        .current_dir(dir);
    // PgBouncer refuses to run as root.
    if let Some(who) = run_as() {
        cmd.uid(who.uid).gid(who.gid).env("HOME", &who.home);
    }
    ProcessGuard::spawn(name, cmd, &dir.join("pgbouncer.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_hosts_are_read_from_the_databases_section() {
        let ini = "[databases]\n; comment host=no\n* = host=pg-primary.db.svc port=5432\n\n[pgbouncer]\nlisten_port = 5432\n";
        assert_eq!(database_hosts(ini), vec!["pg-primary.db.svc"]);
    }

    #[test]
    fn only_addresses_and_mounted_paths_are_rewritten() {
        let volume = VolumeView {
            command: Vec::new(),
            mount_path: "/etc/pgbouncer".to_owned(),
            files: BTreeMap::from([
                (
                    "pgbouncer.ini".to_owned(),
                    "[databases]\n* = host=pg-primary.db.svc port=5432\n[pgbouncer]\nlisten_addr = *\nlisten_port = 5432\nauth_file = /etc/pgbouncer/userlist.txt\npool_mode = session\n".to_owned(),
                ),
                ("userlist.txt".to_owned(), "\"pgbouncer\" \"pw\"\n".to_owned()),
            ]),
        };
        let files = rewrite_files(
            HashMap::from([("pg-primary.db.svc".to_owned(), 4000)]),
            4001,
            &volume,
            Path::new("/tmp/pod"),
        );
        assert_eq!(
            files["pgbouncer.ini"],
            "[databases]\n* = host=127.0.0.1 port=4000\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = 4001\nauth_file = /tmp/pod/volume/userlist.txt\npool_mode = session\n"
        );
        assert_eq!(files["userlist.txt"], "\"pgbouncer\" \"pw\"\n");
    }
}
