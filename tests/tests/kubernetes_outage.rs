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
