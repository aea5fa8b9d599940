//! The etcd DCS against a real etcd, below the HA loop: the compare-and-set writes whose
//! conditions the simulation trusts.

use std::time::Duration;

use pgwarden::config::Timing;
use pgwarden::dcs::etcd::{EtcdDcs, EtcdSettings};
use pgwarden::dcs::{ClusterView, Dcs};
use pgwarden_tests::harness::etcd::Etcd;

async fn member(etcd: &Etcd, name: &str) -> EtcdDcs {
    EtcdDcs::connect(EtcdSettings {
        endpoints: vec![etcd.endpoint()],
        username: None,
        password: None,
        namespace: "/service".into(),
        scope: "claims".into(),
        name: name.into(),
        timing: Timing {
            ttl: Duration::from_secs(10),
            loop_wait: Duration::from_secs(1),
            retry_timeout: Duration::from_secs(5),
            fence: Default::default(),
        }
        .fixed(),
    })
    .await
    .expect("connects to etcd")
}

fn claim(view: &ClusterView) -> Option<i64> {
    view.initialize.as_ref().map(|i| i.revision)
}

/// Simulation seed 1796600013456: a member withdrew an abandoned bootstrap claim after another
/// member had claimed anew, and both bootstrapped. The withdrawal now deletes `initialize` only
/// at the revision it timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_bootstrap_claim_is_withdrawn_only_at_the_revision_that_was_timed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd starts");
    let (a, b) = (member(&etcd, "a").await, member(&etcd, "b").await);

    let (ia, ib) = tokio::join!(a.race_initialize(""), b.race_initialize(""));
    let (ia, ib) = (ia.expect("a answered"), ib.expect("b answered"));
    assert!(ia ^ ib, "exactly one member wins initialize: a={ia} b={ib}");
    let stale = claim(&a.cluster().await.expect("read")).expect("claimed");

    assert!(a.cancel_initialize(Some(stale)).await.expect("answered"));
    assert_eq!(a.cluster().await.expect("read").initialize, None);
    assert!(b.race_initialize("").await.expect("answered"));
    assert!(
        !a.cancel_initialize(Some(stale)).await.expect("answered"),
        "a withdrawal at a stale revision must not delete the new claim"
    );
    let view = a.cluster().await.expect("read");
    assert_eq!(view.initialize_value(), Some(""));
    let fresh = claim(&view).expect("claimed anew");
    assert_ne!(fresh, stale);

    // The owner's own cancel after a failed bootstrap stays unconditional (Patroni's
    // `cancel_initialization`); the key is gone afterwards.
    assert!(b.cancel_initialize(None).await.expect("answered"));
    assert_eq!(b.cluster().await.expect("read").initialize, None);
}
