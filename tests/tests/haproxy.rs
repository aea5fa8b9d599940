//! The shipped HAProxy configuration (deploy/haproxy/haproxy.cfg) in front of a real 3-member
//! cluster: a client writing through HAProxy follows a switchover to the new primary. How long
//! its writes pause is measured by the benchmark, not asserted here.

use std::time::{Duration, Instant};

use pgwarden_tests::harness::haproxy::{self, reached, Backend, HaProxy};
use pgwarden_tests::harness::writer::{Target, Writer};
use pgwarden_tests::harness::{missing_tool, wait_until, ClusterOptions, Member, TestEnv};

const T: Duration = Duration::from_secs(90);

fn member<'a>(env: &'a TestEnv, name: &str) -> &'a Member {
    env.members.iter().find(|m| m.name == name).expect("member")
}

#[tokio::test(flavor = "multi_thread")]
async fn haproxy_takes_writers_to_the_new_primary_after_a_switchover() {
    let Some(binary) = haproxy::binary() else {
        missing_tool("haproxy is not installed (scripts/install-deps.sh installs it)");
        return;
    };
    // The file as shipped is valid as it stands, not only once rewritten.
    haproxy::check(&binary, &haproxy::shipped_config_path()).expect("the shipped file is valid");

    let mut env = TestEnv::start(ClusterOptions {
        scope: "haproxy".into(),
        ..Default::default()
    })
    .await
    .expect("etcd");
    for name in ["pg0", "pg1", "pg2"] {
        env.add_member(name);
    }
    for i in 0..3 {
        env.start_member(i).expect("start");
    }
    let old = env.wait_for_leader(T).await;
    wait_until("both replicas stream", T, || async {
        let mut n = 0;
        for r in env.members.iter().filter(|r| r.name != old) {
            n += usize::from(r.is_streaming_replica().await);
        }
        n == 2
    })
    .await;
    env.create_writer_table(&old).await;

    let template = std::fs::read_to_string(haproxy::shipped_config_path()).expect("read");
    let backends: Vec<Backend> = env
        .members
        .iter()
        .map(|m| Backend {
            name: m.name.clone(),
            pg_port: m.pg_port,
            api_port: m.api_port,
        })
        .collect();
    let proxy = HaProxy::start(env.dir.path(), "haproxy", &template, &backends)
        .await
        .expect("haproxy starts");
    let port = proxy.port("primary");
    let password = member(&env, &old).superuser_password.clone();
    let old_port = member(&env, &old).pg_port;
    wait_until("HAProxy's primary port reaches the leader", T, || async {
        reached(port, &password).await == Some((old_port, false))
    })
    .await;
    proxy
        .wait_settled("primary", &old, T)
        .await
        .expect("only the leader is up in the primary section");
    // The replicas port reaches a replica.
    let replica_port = proxy.port("replicas");
    wait_until("HAProxy's replicas port reaches a replica", T, || async {
        reached(replica_port, &password)
            .await
            .is_some_and(|(p, recovery)| p != old_port && recovery)
    })
    .await;

    let writer = Writer::start(vec![Target {
        name: "haproxy".into(),
        port,
        password: password.clone(),
    }]);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let candidate = env
        .members
        .iter()
        .map(|m| m.name.clone())
        .find(|n| *n != old)
        .expect("candidate");
    let body = format!(r#"{{"leader": "{old}", "candidate": "{candidate}"}}"#);
    let (code, text) = member(&env, &old)
        .api_request("POST", "/switchover", Some(&body))
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");
    let new_port = member(&env, &candidate).pg_port;
    wait_until(
        "HAProxy's primary port reaches the new primary",
        T,
        || async { reached(port, &password).await == Some((new_port, false)) },
    )
    .await;
    let routed = Instant::now();
    proxy
        .wait_settled("primary", &candidate, T)
        .await
        .expect("only the new primary is up in the primary section");
    // Let the writer go on through HAProxy for a while (a window, not a bound).
    wait_until("the old primary is a streaming replica", T, || async {
        member(&env, &old).is_streaming_replica().await
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acks = writer.stop().await;
    let before: Vec<i64> = acks
        .iter()
        .filter(|a| a.at < routed)
        .map(|a| a.id)
        .collect();
    let after: Vec<i64> = acks
        .iter()
        .filter(|a| a.at > routed)
        .map(|a| a.id)
        .collect();
    assert!(
        !before.is_empty(),
        "no write went through HAProxy before the switchover"
    );
    assert!(
        !after.is_empty(),
        "no write went through HAProxy after the switchover; HAProxy's log:\n{}",
        proxy.process.log_tail(30)
    );
    // Every write acknowledged through HAProxy is on the new primary: those before the
    // switchover by replication, those after it because they were made there (the old primary
    // is a replica by then and refuses writes).
    let ids: Vec<String> = acks.iter().map(|a| a.id.to_string()).collect();
    let on_new = member(&env, &candidate)
        .sql(&format!(
            "SELECT count(*)::text FROM pgwarden_writer WHERE id IN ({})",
            ids.join(",")
        ))
        .await
        .expect("count on the new primary");
    assert_eq!(
        on_new,
        vec![acks.len().to_string()],
        "acknowledged writes missing"
    );
    assert_eq!(
        member(&env, &candidate)
            .sql("SELECT pg_is_in_recovery()::text")
            .await
            .expect("query"),
        vec!["false"]
    );
    drop(proxy);
}
