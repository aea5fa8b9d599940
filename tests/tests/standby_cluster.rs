//! A standby cluster on real PostgreSQL 15, as Patroni runs one (`standby_cluster` in the
//! dynamic configuration): its first member clones the source instead of running initdb and
//! holds the lock as the standby leader, replicating from the source's primary; the other
//! members cascade from it; nothing accepts writes; a switchover moves the standby leader;
//! removing `standby_cluster` with `PATCH /config` promotes it, and the replica follows.

use std::time::Duration;

use pgwarden_tests::harness::{wait_until, ClusterOptions, Member, TestEnv};

const T: Duration = Duration::from_secs(120);

fn yaml(text: &str) -> serde_yaml::Value {
    serde_yaml::from_str(text).expect("valid YAML")
}

/// The port the member's WAL receiver streams from, if it streams.
async fn streams_from(m: &Member) -> Option<u16> {
    m.streaming_from().await.map(|(port, _)| port)
}

async fn count(m: &Member) -> Option<String> {
    m.sql("SELECT count(*)::text FROM t")
        .await
        .ok()?
        .first()
        .cloned()
}

async fn status(m: &Member, path: &str) -> Option<u16> {
    m.api_get(path).await.map(|(code, _)| code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_cluster_replicates_cascades_switches_over_and_is_promoted() {
    let mut env = TestEnv::start(ClusterOptions {
        scope: "source".into(),
        ..Default::default()
    })
    .await
    .expect("etcd");
    let s = env.add_member("s0");
    env.start_member(s).expect("start s0");
    env.wait_for_leader(T).await;
    env.members[s]
        .sql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)")
        .await
        .expect("rows on the source");
    let source_port = env.members[s].pg_port;
    let source_sysid = env.members[s]
        .sql("SELECT system_identifier::text FROM pg_control_system()")
        .await
        .expect("sysid");

    // on_role_change records `action role` per member.
    let calls = tempfile::tempdir().expect("tempdir");
    // The agents run as another user (postgres) than the test.
    std::fs::set_permissions(
        calls.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let calls_of = |name: &str| calls.path().join(name);
    let mut dr = Vec::new();
    for name in ["d0", "d1"] {
        let i = env.add_member(name);
        let m = &mut env.members[i];
        m.set(
            "postgresql.callbacks.on_role_change",
            format!(
                "/bin/sh -c 'echo \"$1 $2\" >> {}' callback",
                calls_of(name).display()
            )
            .into(),
        );
        m.set("scope", "dr".into());
        m.set(
            "bootstrap.dcs.standby_cluster",
            yaml(&format!("host: 127.0.0.1\nport: {source_port}\n")),
        );
        dr.push(i);
    }
    let (d0, d1) = (dr[0], dr[1]);
    env.start_member(d0).expect("start d0");

    // d0 clones the source and becomes the standby leader: read-only, streaming from s0.
    wait_until("d0 is the standby leader", T, || {
        let (etcd, m) = (&env.etcd, &env.members[d0]);
        async move {
            etcd.get("/service/dr/leader")
                .await
                .ok()
                .flatten()
                .as_deref()
                == Some("d0")
                && status(m, "/standby-leader").await == Some(200)
                && streams_from(m).await == Some(source_port)
        }
    })
    .await;
    let leader = &env.members[d0];
    assert_eq!(status(leader, "/leader").await, Some(200));
    assert_eq!(status(leader, "/primary").await, Some(503));
    assert_eq!(status(leader, "/replica").await, Some(503));
    let record = env
        .etcd
        .get("/service/dr/members/d0")
        .await
        .expect("etcd")
        .expect("d0's member key");
    let record: serde_json::Value = serde_json::from_str(&record).expect("member JSON");
    assert_eq!(record["role"], "standby_leader", "{record}");
    assert_eq!(
        env.etcd.get("/service/dr/initialize").await.expect("etcd"),
        Some(source_sysid[0].clone()),
        "the standby cluster runs the source's data"
    );
    assert!(
        leader.sql("INSERT INTO t VALUES (100)").await.is_err(),
        "the standby leader refused a write"
    );
    let called = |name: &str, line: &str| {
        std::fs::read_to_string(calls_of(name))
            .unwrap_or_default()
            .lines()
            .any(|l| l == line)
    };
    wait_until("d0's on_role_change names standby_leader", T, || async {
        called("d0", "on_role_change standby_leader")
    })
    .await;

    // d1 cascades from the standby leader, not from the source.
    env.start_member(d1).expect("start d1");
    let d0_port = env.members[d0].pg_port;
    wait_until("d1 streams from d0", T, || {
        let m = &env.members[d1];
        async move { streams_from(m).await == Some(d0_port) && status(m, "/replica").await == Some(200) }
    })
    .await;
    env.members[s]
        .sql("INSERT INTO t SELECT generate_series(11, 20)")
        .await
        .expect("more rows on the source");
    wait_until("the source's rows reach d1 through d0", T, || {
        let m = &env.members[d1];
        async move { count(m).await.as_deref() == Some("20") }
    })
    .await;

    // A switchover inside the standby cluster: d1 becomes the standby leader and follows the
    // source, d0 follows d1.
    let (code, text) = env.members[d0]
        .api_request(
            "POST",
            "/switchover",
            Some(r#"{"leader": "d0", "candidate": "d1"}"#),
        )
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");
    let d1_port = env.members[d1].pg_port;
    wait_until("d1 is the standby leader and d0 follows it", T, || {
        let (a, b) = (&env.members[d0], &env.members[d1]);
        async move {
            status(b, "/standby-leader").await == Some(200)
                && streams_from(b).await == Some(source_port)
                && streams_from(a).await == Some(d1_port)
        }
    })
    .await;
    wait_until(
        "on_role_change: standby_leader on d1, replica on d0",
        T,
        || async {
            called("d1", "on_role_change standby_leader") && called("d0", "on_role_change replica")
        },
    )
    .await;
    env.members[s]
        .sql("INSERT INTO t SELECT generate_series(21, 30)")
        .await
        .expect("rows after the switchover");
    wait_until("the source's rows reach d0 through d1", T, || {
        let m = &env.members[d0];
        async move { count(m).await.as_deref() == Some("30") }
    })
    .await;

    // Promotion: `standby_cluster` removed from the dynamic configuration.
    let (code, text) = env.members[d1]
        .api_request("PATCH", "/config", Some(r#"{"standby_cluster": null}"#))
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");
    wait_until("d1 is promoted", T, || {
        let m = &env.members[d1];
        async move {
            status(m, "/primary").await == Some(200)
                && m.sql("INSERT INTO t VALUES (1000)").await.is_ok()
        }
    })
    .await;
    wait_until("d1's on_role_change names primary", T, || async {
        called("d1", "on_role_change primary")
    })
    .await;
    wait_until("d0 follows the promoted d1", T, || {
        let m = &env.members[d0];
        async move {
            streams_from(m).await == Some(d1_port) && count(m).await.as_deref() == Some("31")
        }
    })
    .await;
    assert_eq!(
        count(&env.members[s]).await.as_deref(),
        Some("30"),
        "the source is untouched"
    );
}
