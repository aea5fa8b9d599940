//! Kubernetes mode when the API server itself fails: frozen with SIGSTOP. This file owns its
//! apiserver (freezing the shared one would disturb the other tests).

use std::time::Duration;

use pgwarden_tests::harness::kube::{KubeCluster, KubeOptions};
use pgwarden_tests::harness::kubelet::KubeMembers;
use pgwarden_tests::harness::writer::{assert_no_split_brain, Writer, CREATE_TABLE};
use pgwarden_tests::harness::{wait_until, ClusterOptions};

const T: Duration = Duration::from_secs(120);

/// With the API server frozen nobody can renew or take the Lease. The leader cannot confirm a
/// renewal, so it must stop accepting writes before `leaseDurationSeconds` can have elapsed on
/// any observer's clock; when the server returns, exactly one leader remains and the other
/// member streams from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_apiserver_makes_the_leader_demote_before_its_lease_can_expire() {
    let cluster = KubeCluster::start(KubeOptions::default())
        .await
        .expect("apiserver");
    let k = KubeMembers::start(
        cluster.access.clone(),
        ClusterOptions::default(),
        &["pg0", "pg1"],
    )
    .await
    .expect("members");
    let leader = k.wait_for_leader(T, None).await;
    let replica = k
        .env
        .members
        .iter()
        .find(|m| m.name != leader)
        .expect("replica");
    wait_until("the replica streams", T, || replica.is_streaming_replica()).await;
    let l = &k.env.members[k.index(&leader)];
    l.sql(CREATE_TABLE).await.expect("table");
    let writer = Writer::start(k.env.writer_targets());
    tokio::time::sleep(Duration::from_millis(500)).await;

    cluster.apiserver.sigstop();
    let frozen_at = std::time::Instant::now();
    // ttl is 10 s: the leader must be read-only (postgres stopped or demoted) within it. The
    // wait's bound is generous; what proves the rule is that writes stopped while the server
    // was still frozen, i.e. while nobody could have taken over.
    wait_until(
        "the leader stops accepting writes while the API server is frozen",
        Duration::from_secs(30),
        || async {
            l.sql("SELECT pg_is_in_recovery()::text")
                .await
                .map_or(true, |r| r != vec!["false".to_owned()])
        },
    )
    .await;
    let fenced_after = frozen_at.elapsed();
    cluster.apiserver.sigcont();
    eprintln!("the leader stopped accepting writes {fenced_after:?} after the freeze");

    let new = k.wait_for_leader(T, None).await;
    let other = k.env.members.iter().find(|m| m.name != new).expect("other");
    wait_until("the other member streams from the leader", T, || {
        other.is_streaming_replica()
    })
    .await;
    // Exactly one member accepts writes.
    let mut primaries = Vec::new();
    for m in &k.env.members {
        if m.sql("SELECT pg_is_in_recovery()::text").await.ok() == Some(vec!["false".to_owned()]) {
            primaries.push(m.name.clone());
        }
    }
    assert_eq!(primaries, vec![new.clone()]);
    let acks = writer.stop().await;
    assert_no_split_brain(&acks);
    let log = l.log_text();
    // Either the HA loop saw its renewal fail, or (when the renewal is still hanging on the
    // frozen server, as under load) the supervisor's fence fired first: both stop postgres.
    assert!(
        log.contains("could not renew the leader lease")
            || log.contains("fencing: the leader lease could not be confirmed in time"),
        "the leader noticed it could not renew"
    );
}

/// Failsafe mode on the API server (docs/ha.md, "Failsafe mode"): the leader publishes the
/// topology in the `<scope>-status` ConfigMap; with the API server frozen for longer than the
/// ttl, it keeps accepting writes because the other member accepts its `POST /failsafe`, and
/// when the server returns the same member leads and the other streams from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_failsafe_mode_a_frozen_apiserver_leaves_the_leader_running() {
    let cluster = KubeCluster::start(KubeOptions::default())
        .await
        .expect("apiserver");
    let mut k = KubeMembers::start(cluster.access.clone(), ClusterOptions::default(), &[])
        .await
        .expect("namespace");
    for name in ["pg0", "pg1"] {
        let i = k.add_pod(name).await.expect("pod");
        k.env.members[i].set("bootstrap.dcs.failsafe_mode", true.into());
        k.start_agent(i).expect("agent");
    }
    let leader = k.wait_for_leader(T, None).await;
    let l = &k.env.members[k.index(&leader)];
    let replica = k
        .env
        .members
        .iter()
        .find(|m| m.name != leader)
        .expect("replica");
    wait_until("the replica streams", T, || replica.is_streaming_replica()).await;
    wait_until("the failsafe topology names both members", T, || async {
        l.api_get("/failsafe")
            .await
            .is_some_and(|(code, body)| code == 200 && body.contains("pg0") && body.contains("pg1"))
    })
    .await;
    l.sql(CREATE_TABLE).await.expect("table");
    let writer = Writer::start(k.env.writer_targets());
    tokio::time::sleep(Duration::from_millis(500)).await;

    cluster.apiserver.sigstop();
    let frozen_at = std::time::Instant::now();
    // Two ttls (10 s each): without failsafe the leader is fenced within one.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let still_primary =
        l.sql("SELECT pg_is_in_recovery()::text").await.ok() == Some(vec!["false".to_owned()]);
    let active = l
        .api_get("/patroni")
        .await
        .is_some_and(|(_, body)| body.contains("\"failsafe_mode_is_active\":true"));
    cluster.apiserver.sigcont();
    assert!(still_primary, "the leader was fenced: {}", l.log_tail(40));
    assert!(active, "the leader did not report failsafe mode");

    let after = k.wait_for_leader(T, None).await;
    assert_eq!(after, leader);
    wait_until("the replica streams again", T, || {
        replica.is_streaming_replica()
    })
    .await;
    let acks = writer.stop().await;
    assert_no_split_brain(&acks);
    assert!(
        acks.iter()
            .any(|a| a.member == leader && a.at > frozen_at + Duration::from_secs(15)),
        "the leader acknowledged writes while the API server was frozen"
    );
}
