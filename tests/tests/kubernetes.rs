//! Kubernetes mode against a real kube-apiserver v1.20 and kube-controller-manager, shared by
//! the tests of this file (one namespace each). The agents authenticate with a token bound to
//! exactly the Role in `deploy/agent-rbac.yaml` (RBAC on); the harness plays the kubelet
//! (`harness::kubelet`). Scenarios as in etcd mode (`failover.rs`, `operations.rs`).

use std::time::Duration;

use k8s_openapi::api::rbac::v1::RoleBinding;
use pgwarden::dcs::kubernetes::members::RoleLabels;
use pgwarden::dcs::kubernetes::{KubeDcs, KubeSettings};
use pgwarden::dcs::{Dcs, DcsError};
use pgwarden_tests::harness::kube::{KubeCluster, AGENT_ROLE, AGENT_TOKEN};
use pgwarden_tests::harness::kubelet::KubeMembers;
use pgwarden_tests::harness::writer::{assert_no_split_brain, Writer};
use pgwarden_tests::harness::{agent_binary, wait_until, ClusterOptions};

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

/// The first write the writer saw acknowledged by `member`.
fn first_write_on(
    acks: &[pgwarden_tests::harness::writer::Ack],
    member: &str,
) -> std::time::Instant {
    acks.iter()
        .filter(|a| a.member == member)
        .map(|a| a.at)
        .min()
        .unwrap_or_else(|| panic!("no write was acknowledged by {member}"))
}

/// Issue 20 item 5: the new leader labels its Pod as soon as postgres leaves recovery, not on
/// its next tick. With `loop_wait` 10 s the primary Service used to have no endpoint for up to
/// 10 s after the new primary accepted writes; it must now follow well before that tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_service_follows_a_promotion_before_the_next_loop_wait_tick() {
    let options = ClusterOptions {
        ttl: 30,
        loop_wait: 10,
        retry_timeout: 5,
        ..Default::default()
    };
    let k = KubeMembers::start(KubeCluster::shared(), options, &["pg0", "pg1"])
        .await
        .expect("start the members");
    k.create_role_service("test-primary", "primary")
        .await
        .expect("service");
    let old = k.wait_for_leader(T, None).await;
    wait_for_streaming(&k, &old, 1).await;
    wait_for_roles(&k, &old).await;
    wait_until(
        "the primary Service's endpoints are the leader's Pod",
        T,
        || async { k.endpoint_pods("test-primary").await == vec![old.clone()] },
    )
    .await;
    let writer = start_writer(&k, &old).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let candidate = k
        .env
        .members
        .iter()
        .map(|m| m.name.clone())
        .find(|n| *n != old)
        .expect("candidate");
    let body = format!(r#"{{"leader": "{old}", "candidate": "{candidate}"}}"#);
    let switchover = k.env.members[k.index(&old)].api_request("POST", "/switchover", Some(&body));
    let followed = async {
        let deadline = std::time::Instant::now() + T;
        while std::time::Instant::now() < deadline {
            if k.endpoint_pods("test-primary").await == vec![candidate.clone()] {
                return Some(std::time::Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    };
    let (answer, followed) = tokio::join!(switchover, followed);
    let (code, text) = answer.expect("answers");
    assert_eq!(code, 200, "{text}");
    let followed = followed.expect("the primary Service follows the new leader");
    let acks = writer.stop().await;
    assert_no_split_brain(&acks);
    let behind = followed.saturating_duration_since(first_write_on(&acks, &candidate));
    // Half of `loop_wait`: the tick after the promotion comes 10 s after it.
    assert!(
        behind < Duration::from_secs(5),
        "the primary Service followed {candidate} {behind:?} after its first write (loop_wait 10 s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_leader_agent_fails_over_by_its_guards_release_and_it_rejoins() {
    let mut k = members(&["pg0", "pg1"]).await;
    let old = k.wait_for_leader(T, None).await;
    wait_for_streaming(&k, &old, 1).await;
    let writer = start_writer(&k, &old).await;

    let i = k.index(&old);
    k.env.members[i].agent().kill9();
    let new = k.wait_for_leader(T, Some(&old)).await;
    // The dead leader's Pod still exists (no kubelet deletes it); the new leader clears its
    // role label, so a Service selecting `role=primary` no longer lists it.
    wait_until(
        &format!("the dead leader {old}'s Pod loses role=primary"),
        Duration::from_secs(10),
        || async { k.role_label(&old).await.as_deref() != Some("primary") },
    )
    .await;

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
    // Not the lease running out: the fence guard proved postgres stopped and released the
    // Lease its dead agent wrote.
    let log = k.env.members[i].log_text();
    assert!(
        log.contains("released the leader"),
        "the guard released the Lease:\n{log}"
    );
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
    // An abandoned claim is withdrawn only at the revision that was timed: once withdrawn and
    // claimed anew, the stale withdrawal leaves the new claim alone.
    let claim = |v: &pgwarden::dcs::ClusterView| v.initialize.as_ref().map(|i| i.revision);
    let stale = claim(&a.cluster().await.expect("read")).expect("claimed");
    assert!(a.cancel_initialize(Some(stale)).await.expect("answered"));
    assert!(b.race_initialize("").await.expect("answered"));
    assert!(
        !a.cancel_initialize(Some(stale)).await.expect("answered"),
        "a withdrawal at a stale revision must not delete the new claim"
    );
    let fresh = a.cluster().await.expect("read");
    assert_eq!(fresh.initialize_value(), Some(""));
    assert_ne!(claim(&fresh), Some(stale));
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

    // The crash release (`pgwarden release-leader`, a new process under the same member name)
    // clears the holder only if the dead agent's process wrote it. That token does not change
    // with renewals, so the guard holds the right one even if the agent is killed after a
    // renewal was applied but before its answer was read.
    let token = other
        .release_token()
        .borrow()
        .clone()
        .expect("the holder has a token");
    other.renew_leader().await.expect("renew");
    assert_eq!(other.release_token().borrow().as_ref(), Some(&token));
    let stale = holder.release_token().borrow().clone();
    assert_eq!(
        stale, None,
        "the old holder learnt the Lease is not its own"
    );
    let release = dcs(other_name).await;
    let foreign = token
        .rsplit_once(':')
        .map(|(p, _)| format!("{p}:1-2"))
        .expect("prefix");
    assert!(!release
        .release_dead_leader(&foreign)
        .await
        .expect("answered"));
    assert_eq!(
        release.cluster().await.expect("read").leader_name(),
        Some(other_name),
        "another process's token releases nothing"
    );
    assert!(release.release_dead_leader(&token).await.expect("answered"));
    assert!(release.cluster().await.expect("read").leader.is_none());
    assert!(
        !release.release_dead_leader(&token).await.expect("answered"),
        "released once"
    );
}

/// A 403 on the leader's renewal (the agents' RoleBinding missing for a few seconds, as while
/// it is replaced) says nothing about who holds the Lease: the renewal is unconfirmed, the
/// leader keeps leading within its fence deadline, the next renewal succeeds, and nothing
/// logs the lease as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_403_on_renewal_does_not_cost_the_leadership() {
    let k = members(&["pg0", "pg1"]).await;
    let leader = k.wait_for_leader(T, None).await;
    wait_for_streaming(&k, &leader, 1).await;
    let bindings: kube::Api<RoleBinding> = kube::Api::namespaced(k.admin.clone(), &k.namespace);
    let mut binding = bindings
        .get(AGENT_ROLE)
        .await
        .expect("the agents' RoleBinding");
    bindings
        .delete(AGENT_ROLE, &Default::default())
        .await
        .expect("delete the RoleBinding");
    tokio::time::sleep(Duration::from_secs(3)).await;
    binding.metadata.resource_version = None;
    binding.metadata.uid = None;
    bindings
        .create(&Default::default(), &binding)
        .await
        .expect("recreate the RoleBinding");
    let m = &k.env.members[k.index(&leader)];
    wait_until(&format!("{leader} renews again"), T, || async {
        m.log_text().contains("could not renew the leader lease")
            && m.api_get("/primary").await.map(|(s, _)| s) == Some(200)
    })
    .await;
    // A few more renewals.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(k.holder().await.as_deref(), Some(leader.as_str()));
    assert_eq!(m.api_get("/primary").await.map(|(s, _)| s), Some(200));
    for member in &k.env.members {
        let log = member.log_text();
        assert!(
            !log.contains("the leader lease is lost"),
            "{}: a transient 403 was taken for a lost lease",
            member.name
        );
    }
    assert!(
        !m.log_text().contains("demot"),
        "the leader must not demote"
    );
}

/// `pgwarden -c ctl.yml args` against `k`'s cluster from a kubeconfig, as an operator outside
/// the cluster runs it (here with the agents' token: reading and `config` edits need nothing
/// more): (success, stdout and stderr).
fn kube_ctl(k: &KubeMembers, args: &[&str]) -> (bool, String) {
    let dir = k.env.dir.path();
    let config = dir.join("ctl.yml");
    std::fs::write(
        &config,
        format!(
            "scope: {}\nkubernetes:\n  namespace: {}\n  labels: {{application: pgwarden-test}}\n  scope_label: cluster-name\n  role_label: role\n",
            k.env.options.scope, k.namespace
        ),
    )
    .expect("write the ctl config");
    let kubeconfig = dir.join("ctl.kubeconfig");
    std::fs::write(&kubeconfig, k.access.kubeconfig(AGENT_TOKEN, None)).expect("kubeconfig");
    let out = std::process::Command::new(agent_binary())
        .arg("-c")
        .arg(&config)
        .args(args)
        .env("KUBECONFIG", &kubeconfig)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("the binary runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The cells of the table row whose first cell is `first`.
fn table_row(table: &str, first: &str) -> Option<Vec<String>> {
    table
        .lines()
        .map(|l| {
            l.split('|')
                .map(|c| c.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .find(|cells| cells.get(1).map(String::as_str) == Some(first))
}

/// The operator's commands work on a Kubernetes-mode cluster from a kubeconfig, with the
/// output of etcd mode: list, edit-config, pause/resume, switchover, history, reload, restart,
/// reinit, failover; `remove` is refused with a clear message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_operates_a_kubernetes_mode_cluster_from_a_kubeconfig() {
    let k = members(&["pg0", "pg1", "pg2"]).await;
    let leader = k.wait_for_leader(T, None).await;
    wait_for_streaming(&k, &leader, 2).await;
    let replicas: Vec<String> = ["pg0", "pg1", "pg2"]
        .iter()
        .map(|n| n.to_string())
        .filter(|n| *n != leader)
        .collect();

    // list: patronictl's table, the same as in etcd mode.
    let mut out = String::new();
    wait_until(
        "list shows the leader and two streaming replicas",
        T,
        || {
            let (ok, text) = kube_ctl(&k, &["list"]);
            let whole = ok
                && text.contains("+ Cluster: test (")
                && table_row(&text, &leader).is_some_and(|r| r[3] == "Leader" && r[4] == "running")
                && replicas.iter().all(|m| {
                    table_row(&text, m).is_some_and(|r| r[3] == "Replica" && r[4] == "streaming")
                });
            out = text;
            async move { whole }
        },
    )
    .await;
    assert!(
        out.contains("| Member |") && out.contains("|  Role   |"),
        "{out}"
    );
    let (ok, json) = kube_ctl(&k, &["list", "--format", "json"]);
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    assert!(ok && rows.as_array().map(Vec::len) == Some(3), "{json}");

    // edit-config writes the `config` the agents apply (a reload parameter).
    let (ok, text) = kube_ctl(&k, &["edit-config", "--pg", "work_mem=7MB", "--force"]);
    assert!(ok && text.contains("Configuration changed"), "{text}");
    wait_until("every member runs with work_mem 7MB", T, || async {
        for m in &k.env.members {
            if m.sql("SHOW work_mem").await.ok().as_deref() != Some(&["7MB".to_owned()][..]) {
                return false;
            }
        }
        true
    })
    .await;
    let (ok, text) = kube_ctl(&k, &["show-config"]);
    assert!(ok && text.contains("work_mem: 7MB"), "{text}");

    // pause/resume.
    let (ok, text) = kube_ctl(&k, &["pause", "--wait"]);
    assert!(
        ok && text.contains("cluster management is paused"),
        "{text}"
    );
    let (ok, text) = kube_ctl(&k, &["list"]);
    assert!(ok && text.contains("Maintenance mode: on"), "{text}");
    let (ok, text) = kube_ctl(&k, &["resume", "--wait"]);
    assert!(
        ok && text.contains("cluster management is resumed"),
        "{text}"
    );

    // switchover, then history shows it.
    let candidate = replicas[0].clone();
    let (ok, text) = kube_ctl(&k, &["switchover", "--candidate", &candidate, "--force"]);
    assert!(ok, "{text}");
    let new = k.wait_for_leader(T, Some(&leader)).await;
    assert_eq!(new, candidate);
    wait_for_streaming(&k, &new, 2).await;
    let (ok, text) = kube_ctl(&k, &["history"]);
    assert!(ok && text.contains("| New Leader"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_end().ends_with(candidate.as_str())),
        "{text}"
    );

    // reload, restart and reinit of a replica.
    let replica = leader.clone();
    let (ok, text) = kube_ctl(&k, &["reload", &replica, "--force"]);
    assert!(ok, "{text}");
    let (ok, text) = kube_ctl(&k, &["restart", &replica, "--force"]);
    assert!(ok, "{text}");
    let (ok, text) = kube_ctl(&k, &["reinit", &replica, "--force"]);
    assert!(ok, "{text}");
    wait_for_streaming(&k, &new, 2).await;

    // failover back to the first leader.
    let (ok, text) = kube_ctl(&k, &["failover", "--candidate", &leader, "--force"]);
    assert!(ok, "{text}");
    let back = k.wait_for_leader(T, Some(&new)).await;
    assert_eq!(back, leader);

    let (ok, text) = kube_ctl(&k, &["remove", "test"]);
    assert!(
        !ok && text.contains("not supported for a cluster in Kubernetes"),
        "{text}"
    );
}
