//! Kubernetes mode against a real kube-apiserver v1.20 and kube-controller-manager, shared by
//! the tests of this file (one namespace each). The agents authenticate with a token bound to
//! exactly the Role in `deploy/agent-rbac.yaml` (RBAC on); the harness plays the kubelet
//! (`harness::kubelet`). Scenarios as in etcd mode (`failover.rs`, `operations.rs`).

use std::time::Duration;

use pgwarden::dcs::kubernetes::members::RoleLabels;
use pgwarden::dcs::kubernetes::{KubeDcs, KubeSettings};
use pgwarden::dcs::{Dcs, DcsError};
use pgwarden_tests::harness::kube::{KubeCluster, AGENT_TOKEN};
use pgwarden_tests::harness::kubelet::KubeMembers;
use pgwarden_tests::harness::writer::{assert_no_split_brain, Writer};
use pgwarden_tests::harness::{wait_until, ClusterOptions};

const T: Duration = Duration::from_secs(120);

async fn members(names: &[&str]) -> KubeMembers {
    KubeMembers::start(KubeCluster::shared(), ClusterOptions::default(), names)
        .await
        .expect("start the members")
}

async fn wait_for_streaming(k: &KubeMembers, leader: &str, replicas: usize) {
    wait_until(
        &format!("{replicas} replicas stream from {leader}"),
        T,
        || async {
            let mut streaming = 0;
            for m in k.env.members.iter().filter(|m| m.name != leader) {
                if m.is_streaming_replica().await {
                    streaming += 1;
                }
            }
            streaming == replicas
        },
    )
    .await;
}

async fn wait_for_roles(k: &KubeMembers, leader: &str) {
    wait_until(
        &format!("{leader} is labelled primary and the others replica"),
        T,
        || async {
            for m in &k.env.members {
                let want = if m.name == leader {
                    "primary"
                } else {
                    "replica"
                };
                if k.role_label(&m.name).await.as_deref() != Some(want) {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

async fn start_writer(k: &KubeMembers, leader: &str) -> Writer {
    k.env.create_writer_table(leader).await;
    Writer::start(k.env.writer_targets())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_elect_through_a_lease_and_the_primary_service_follows_a_switchover() {
    let k = members(&["pg0", "pg1", "pg2"]).await;
    k.create_role_service("test-primary", "primary")
        .await
        .expect("service");
    let old = k.wait_for_leader(T, None).await;
    wait_for_streaming(&k, &old, 2).await;
    wait_for_roles(&k, &old).await;
    wait_until(
        "the primary Service's endpoints are the leader's Pod",
        T,
        || async { k.endpoint_pods("test-primary").await == vec![old.clone()] },
    )
    .await;

    let winners = k
        .env
        .members
        .iter()
        .filter(|m| m.log_text().contains("won the initialize race"))
        .count();
    assert_eq!(winners, 1, "exactly one member bootstraps");

    let lease = k.lease().await.expect("lease");
    let spec = lease.spec.expect("spec");
    assert_eq!(spec.lease_duration_seconds, Some(10), "ttl");
    assert!(spec.acquire_time.is_some() && spec.renew_time.is_some());
    let transitions = spec.lease_transitions.unwrap_or(0);

    // The cluster state lives in ConfigMaps, in the etcd keys' format.
    let maps: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(k.admin.clone(), &k.namespace);
    let config = maps.get("test-config").await.expect("test-config");
    let a = config.metadata.annotations.expect("annotations");
    let sysid = a.get("initialize").expect("initialize");
    assert!(sysid.parse::<u64>().is_ok(), "{sysid}");
    let dcs_config: serde_json::Value =
        serde_json::from_str(a.get("config").expect("config")).expect("json");
    assert_eq!(dcs_config["ttl"], 10);

    let writer = start_writer(&k, &old).await;
    let candidate = k
        .env
        .members
        .iter()
        .map(|m| m.name.clone())
        .find(|n| *n != old)
        .expect("candidate");
    let body = format!(r#"{{"leader": "{old}", "candidate": "{candidate}"}}"#);
    let (code, text) = k.env.members[k.index(&old)]
        .api_request("POST", "/switchover", Some(&body))
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");
    assert_eq!(k.holder().await.as_deref(), Some(candidate.as_str()));
    wait_for_streaming(&k, &candidate, 2).await;
    wait_for_roles(&k, &candidate).await;
    wait_until(
        "the primary Service's endpoints follow the new leader",
        T,
        || async { k.endpoint_pods("test-primary").await == vec![candidate.clone()] },
    )
    .await;
    let acks = writer.stop().await;
    assert_no_split_brain(&acks);
    assert!(acks.iter().any(|a| a.member == candidate));
    let spec = k.lease().await.and_then(|l| l.spec).expect("spec");
    assert!(spec.lease_transitions.unwrap_or(0) > transitions);
    // The failover request was consumed.
    let failover = maps.get("test-failover").await.expect("test-failover");
    let value = failover
        .metadata
        .annotations
        .and_then(|a| a.get("failover").cloned())
        .unwrap_or_default();
    assert!(
        value.is_empty() || value == "{}",
        "failover cleared: {value}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_leader_agent_fails_over_after_the_lease_and_it_rejoins() {
    let mut k = members(&["pg0", "pg1"]).await;
    let old = k.wait_for_leader(T, None).await;
    wait_for_streaming(&k, &old, 1).await;
    let writer = start_writer(&k, &old).await;

    let i = k.index(&old);
    k.env.members[i].agent().kill9();
    let new = k.wait_for_leader(T, Some(&old)).await;

    // The kubelet restarts the container.
    k.env.members[i].restart().expect("restart");
    wait_until(&format!("{old} rejoins as a replica"), T, || async {
        k.env.members[i].api_get("/replica").await.map(|(s, _)| s) == Some(200)
    })
    .await;
    wait_for_roles(&k, &new).await;
    let acks = writer.stop().await;
    assert_no_split_brain(&acks);
    assert!(
        acks.iter().any(|a| a.member == new),
        "writes resumed on {new}"
    );
    assert_eq!(k.holder().await.as_deref(), Some(new.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_agent_is_fenced_and_another_member_takes_over() {
    let mut k = members(&["pg0", "pg1"]).await;
    let old = k.wait_for_leader(T, None).await;
    wait_for_streaming(&k, &old, 1).await;
    let writer = start_writer(&k, &old).await;
    let i = k.index(&old);
    let postmaster = k.env.members[i].postmaster_pid().expect("postmaster");

    k.env.members[i].agent().sigstop();
    let new = k.wait_for_leader(T, Some(&old)).await;
    // The fence guard stopped the frozen leader's postgres before its Lease could expire.
    assert!(
        !pgwarden_tests::harness::process::pid_alive(postmaster),
        "the frozen leader's postmaster must be stopped by the fence guard"
    );
    k.env.members[i].agent().sigcont();
    wait_until(&format!("{old} rejoins as a replica"), T, || async {
        k.env.members[i].api_get("/replica").await.map(|(s, _)| s) == Some(200)
    })
    .await;
    wait_for_roles(&k, &new).await;
    let acks = writer.stop().await;
    assert_no_split_brain(&acks);
    assert!(acks.iter().any(|a| a.member == new));
}

fn race_settings(namespace: &str, name: &str, ttl: Duration) -> KubeSettings {
    KubeSettings {
        namespace: Some(namespace.to_owned()),
        scope: "race".into(),
        name: name.into(),
        labels: Default::default(),
        scope_label: "cluster-name".into(),
        role: RoleLabels {
            key: "role".into(),
            leader: "primary".into(),
            follower: "replica".into(),
            standby_leader: "primary".into(),
        },
        lease_name: "race-leader".into(),
        timing: pgwarden::config::Timing {
            ttl,
            loop_wait: Duration::from_secs(1),
            retry_timeout: Duration::from_secs(5),
            fence: Default::default(),
        }
        .fixed(),
        // No watches: each member's view of the Lease changes only through its own requests,
        // which makes the stale `resourceVersion` below deterministic.
        watch: false,
    }
}

/// Lease writes race at the API server: creates (201 vs 409), a takeover with a stale
/// `resourceVersion` (409, lost cleanly, the holder keeps it), and a renewal after a takeover
/// (409, re-read, reported lost rather than retried). With the agent token and RBAC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_lease_updates_get_409_and_the_loser_backs_off() {
    let access = KubeCluster::shared();
    let ns = access.create_namespace("race").await.expect("namespace");
    access.bind_agent_role(&ns).await.expect("role");
    let ttl = Duration::from_secs(3);
    let dcs = |name: &'static str| {
        let access = access.clone();
        let ns = ns.clone();
        async move {
            let client = access.client(AGENT_TOKEN).await.expect("client");
            KubeDcs::with_client(client, ns.clone(), race_settings(&ns, name, ttl))
        }
    };
    let (a, b) = (dcs("a").await, dcs("b").await);
    // The bootstrap race: `initialize = ""` taken by one member is taken for the other.
    let (ia, ib) = tokio::join!(a.race_initialize(""), b.race_initialize(""));
    let (ia, ib) = (ia.expect("a answered"), ib.expect("b answered"));
    assert!(ia ^ ib, "exactly one member wins initialize: a={ia} b={ib}");
    assert!(!a.race_initialize("").await.expect("answered"));
    assert!(a.cluster().await.expect("read").leader.is_none());
    assert!(b.cluster().await.expect("read").leader.is_none());
    let (ra, rb) = tokio::join!(a.acquire_leader(), b.acquire_leader());
    let (ra, rb) = (ra.expect("a answered"), rb.expect("b answered"));
    assert!(ra ^ rb, "exactly one create wins: a={ra} b={rb}");
    let (holder, other) = if ra { (&a, &b) } else { (&b, &a) };
    let holder_name = if ra { "a" } else { "b" };
    let other_name = if ra { "b" } else { "a" };
    holder.renew_leader().await.expect("renew");

    // The other member reads the Lease, then the holder renews: the other's resourceVersion
    // is stale. Once a full ttl has passed on its clock it believes the Lease expired and
    // tries to take it over with that resourceVersion: 409, and it has not become leader.
    let view = other.cluster().await.expect("read");
    assert_eq!(view.leader_name(), Some(holder_name));
    holder.renew_leader().await.expect("renew");
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert!(
        !other.acquire_leader().await.expect("answered"),
        "a takeover with a stale resourceVersion must lose"
    );
    assert_eq!(
        other.cluster().await.expect("read").leader_name(),
        Some(holder_name),
        "the holder keeps the Lease"
    );

    // Now the holder stops renewing; after a full ttl on the other's clock the takeover wins,
    // and the old holder's next renewal gets 409, re-reads and reports the Lease lost.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert!(other.cluster().await.expect("read").leader.is_none());
    assert!(other.acquire_leader().await.expect("answered"));
    other.renew_leader().await.expect("the new holder renews");
    match holder.renew_leader().await {
        Err(e @ DcsError::Rejected(_)) => {
            let e = pgwarden::error::error_chain(&e);
            assert!(e.contains(other_name), "{e}")
        }
        other => panic!("the old holder's renewal must be refused, got {other:?}"),
    }
    let lease = other.cluster().await.expect("read");
    assert_eq!(lease.leader_name(), Some(other_name));
}
