//! The kubelet's part for Kubernetes-mode tests: for each member, a Pod in the API server, an
//! agent process started with its Pod's name and namespace (and a kubeconfig for the agent
//! token, which only the Role in `deploy/agent-rbac.yaml` authorizes), and a readiness probe
//! that copies the agent's `GET /readiness` into the Pod's `Ready` condition, so the endpoint
//! controller puts exactly the ready Pods behind a Service.
//!
//! Agents, postgres and the REST API run on loopback; the Pods' IPs in the API are fake
//! (`10.244.0.N`): Endpoints reject loopback addresses, and nothing connects to them.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use kube::api::{Api, PostParams};
use serde_json::json;

use super::kube::{set_pod_ready_with, KubeAccess, AGENT_TOKEN};
use super::{http_request, ClusterOptions, TestEnv};

/// Label every test member Pod carries (`kubernetes.labels`).
pub const APP_LABEL: (&str, &str) = ("application", "pgwarden-test");
pub const SCOPE_LABEL: &str = "cluster-name";
pub const ROLE_LABEL: &str = "role";

/// Members of one cluster as Pods in their own namespace.
pub struct KubeMembers {
    pub access: KubeAccess,
    pub namespace: String,
    /// Directories, configs and agent processes (its etcd is not used by the agents).
    pub env: TestEnv,
    pub admin: kube::Client,
    probes: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeMembers {
    fn drop(&mut self) {
        for p in &self.probes {
            p.abort();
        }
    }
}

/// The fake IP of the `i`-th Pod.
pub fn pod_ip(i: usize) -> String {
    format!("10.244.0.{}", i + 10)
}

impl KubeMembers {
    /// Creates a namespace with the agent Role bound, one Pod per name, and starts each agent
    /// with its readiness probe. Does not wait for a leader.
    pub async fn start(
        access: KubeAccess,
        options: ClusterOptions,
        names: &[&str],
    ) -> anyhow::Result<KubeMembers> {
        let namespace = access.create_namespace("pgw").await?;
        access.bind_agent_role(&namespace).await?;
        let admin = access.admin_client().await?;
        let env = TestEnv::start(options).await?;
        let mut members = KubeMembers {
            access,
            namespace,
            env,
            admin,
            probes: Vec::new(),
        };
        for name in names {
            members.add_pod(name).await?;
        }
        for i in 0..names.len() {
            members.start_agent(i)?;
        }
        Ok(members)
    }

    /// The selector labels of the cluster's Pods.
    pub fn pod_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (APP_LABEL.0.to_owned(), APP_LABEL.1.to_owned()),
            (SCOPE_LABEL.to_owned(), self.env.options.scope.clone()),
        ])
    }

    /// Creates the Pod and the member's configuration in Kubernetes mode (agent not started).
    pub async fn add_pod(&mut self, name: &str) -> anyhow::Result<usize> {
        self.access
            .create_pod(&self.namespace, name, &self.pod_labels())
            .await?;
        let i = self.env.add_member(name);
        let member = &mut self.env.members[i];
        member.set("etcd3", serde_yaml::Value::Null);
        member.set(
            "kubernetes",
            serde_yaml::to_value(json!({
                "labels": {APP_LABEL.0: APP_LABEL.1},
                "scope_label": SCOPE_LABEL,
                "role_label": ROLE_LABEL,
            }))?,
        );
        std::fs::create_dir_all(&member.dir)?;
        // The agent runs as `postgres`: it gets its own copy of the CA, inside its directory.
        let ca = member.dir.join("kube-ca.crt");
        std::fs::copy(&self.access.ca_file, &ca).context("copy the apiserver CA")?;
        let access = KubeAccess {
            ca_file: ca,
            ..self.access.clone()
        };
        let kubeconfig = member.dir.join("kubeconfig");
        std::fs::write(&kubeconfig, access.kubeconfig(AGENT_TOKEN, None))?;
        member.env = vec![
            ("KUBECONFIG".into(), kubeconfig.display().to_string()),
            ("PATRONI_NAME".into(), name.to_owned()),
            (
                "PATRONI_KUBERNETES_NAMESPACE".into(),
                self.namespace.clone(),
            ),
        ];
        Ok(i)
    }

    /// Starts member `i`'s agent and its readiness probe.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        self.env.start_member(i)?;
        let member = &self.env.members[i];
        self.probes.push(tokio::spawn(readiness_probe(
            self.admin.clone(),
            self.namespace.clone(),
            member.name.clone(),
            pod_ip(i),
            member.api_port,
        )));
        Ok(())
    }

    pub fn index(&self, name: &str) -> usize {
        self.env
            .members
            .iter()
            .position(|m| m.name == name)
            .unwrap_or_else(|| panic!("no member {name}"))
    }

    /// The leader Lease (`<scope>-leader`).
    pub async fn lease(&self) -> Option<Lease> {
        let name = format!("{}-leader", self.env.options.scope);
        Api::<Lease>::namespaced(self.admin.clone(), &self.namespace)
            .get_opt(&name)
            .await
            .ok()
            .flatten()
    }

    /// `holderIdentity` of the leader Lease.
    pub async fn holder(&self) -> Option<String> {
        self.lease()
            .await?
            .spec?
            .holder_identity
            .filter(|h| !h.is_empty())
    }

    /// Waits until the Lease holder (other than `except`) answers `/primary` and `/health`
    /// with 200, and returns its name.
    pub async fn wait_for_leader(&self, timeout: Duration, except: Option<&str>) -> String {
        let deadline = std::time::Instant::now() + timeout.mul_f64(super::timeout_mult());
        loop {
            if let Some(h) = self.holder().await.filter(|h| Some(h.as_str()) != except) {
                if let Some(m) = self.env.members.iter().find(|m| m.name == h) {
                    if m.api_get("/primary").await.map(|(s, _)| s) == Some(200)
                        && m.api_get("/health").await.map(|(s, _)| s) == Some(200)
                    {
                        return h;
                    }
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out after {timeout:?} waiting for a leader (not {except:?}) that holds the Lease and answers /primary"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The role label on `pod`.
    pub async fn role_label(&self, pod: &str) -> Option<String> {
        let p = Api::<Pod>::namespaced(self.admin.clone(), &self.namespace)
            .get(pod)
            .await
            .ok()?;
        p.metadata.labels?.get(ROLE_LABEL).cloned()
    }

    /// Creates a Service selecting the cluster's Pods with `role=<role>`.
    pub async fn create_role_service(&self, name: &str, role: &str) -> anyhow::Result<()> {
        let mut selector = self.pod_labels();
        selector.insert(ROLE_LABEL.to_owned(), role.to_owned());
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"selector": selector, "ports": [{"name": "postgresql", "port": 5432, "targetPort": 5432}]},
        }))?;
        Api::<Service>::namespaced(self.admin.clone(), &self.namespace)
            .create(&PostParams::default(), &svc)
            .await?;
        Ok(())
    }

    /// Pods behind `service`'s ready addresses (the endpoint controller's view).
    pub async fn endpoint_pods(&self, service: &str) -> Vec<String> {
        let Ok(Some(ep)) = Api::<Endpoints>::namespaced(self.admin.clone(), &self.namespace)
            .get_opt(service)
            .await
        else {
            return Vec::new();
        };
        let mut pods: Vec<String> = ep
            .subsets
            .unwrap_or_default()
            .into_iter()
            .flat_map(|s| s.addresses.unwrap_or_default())
            .filter_map(|a| a.target_ref.and_then(|r| r.name))
            .collect();
        pods.sort();
        pods
    }
}

/// Copies the agent's readiness into the Pod's `Ready` condition every 300 ms (a failed probe,
/// e.g. a frozen agent, is "not ready", as for the kubelet).
async fn readiness_probe(
    client: kube::Client,
    namespace: String,
    pod: String,
    ip: String,
    api_port: u16,
) {
    let mut last: Option<bool> = None;
    loop {
        let ready = tokio::time::timeout(
            Duration::from_secs(2),
            http_request("GET", api_port, "/readiness", None),
        )
        .await
        .ok()
        .flatten()
        .map(|(s, _)| s)
            == Some(200);
        if last != Some(ready)
            && set_pod_ready_with(&client, &namespace, &pod, &ip, ready)
                .await
                .is_ok()
        {
            last = Some(ready);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
