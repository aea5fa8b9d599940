//! One member on real etcd and PostgreSQL 15: bootstrap, crash restart, clean stop, adoption,
//! refusal of a foreign data directory, REST and metrics, patronictl compatibility.

use std::time::Duration;

use pgwarden_tests::harness::{wait_until, ClusterOptions, TestEnv};

const T: Duration = Duration::from_secs(60);

async fn one_member() -> TestEnv {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd starts");
    let i = env.add_member("pg0");
    env.start_member(i).expect("agent starts");
    let leader = env.wait_for_leader(T).await;
    assert_eq!(leader, "pg0");
    env
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_gives_a_writable_primary_in_patroni_layout() {
    let env = one_member().await;
    let m = &env.members[0];
    m.sql("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .expect("the primary accepts writes");
    assert_eq!(
        m.sql("SELECT pg_is_in_recovery()::text")
            .await
            .expect("sql"),
        vec!["false"]
    );

    let sysid = m
        .sql("SELECT system_identifier::text FROM pg_control_system()")
        .await
        .expect("sql")
        .remove(0);
    assert_eq!(
        env.etcd.get(&env.key("initialize")).await.expect("etcd"),
        Some(sysid),
        "`initialize` records the system identifier"
    );
    let config = env
        .etcd
        .get(&env.key("config"))
        .await
        .expect("etcd")
        .expect("config seeded from bootstrap.dcs");
    assert_eq!(json(&config)["ttl"], 10);

    // The member record fills as soon as the first cycle after bootstrap ran.
    let key = env.key("members/pg0");
    wait_until("the member record says running primary", T, || async {
        env.etcd
            .get(&key)
            .await
            .ok()
            .flatten()
            .map(|v| json(&v))
            .is_some_and(|r| r["state"] == "running" && r["role"] == "primary")
    })
    .await;
    let record = json(&env.etcd.get(&key).await.expect("etcd").expect("member"));
    assert_eq!(
        record["conn_url"],
        format!("postgres://127.0.0.1:{}/postgres", m.pg_port)
    );
    assert_eq!(
        record["api_url"],
        format!("http://127.0.0.1:{}/patroni", m.api_port)
    );
    assert_eq!(record["version"], "4.1.4");
    assert_eq!(record["timeline"], 1);
    assert!(record["xlog_location"].as_u64().is_some_and(|x| x > 0));
    let status = json(
        &env.etcd
            .get(&env.key("status"))
            .await
            .expect("etcd")
            .expect("status"),
    );
    assert!(status["optime"].as_u64().is_some_and(|x| x > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_postmaster_is_restarted_and_the_member_keeps_the_lock() {
    let env = one_member().await;
    let m = &env.members[0];
    m.sql("CREATE TABLE t (id int); INSERT INTO t VALUES (42)")
        .await
        .expect("write");
    let before = m.postmaster_pid().expect("postmaster runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the postmaster");
    wait_until("a new postmaster accepts writes", T, || async {
        m.postmaster_pid().is_some_and(|p| p != before)
            && m.sql("INSERT INTO t VALUES (43)").await.is_ok()
    })
    .await;
    assert_eq!(env.leader().await.as_deref(), Some("pg0"), "same leader");
    assert_eq!(
        m.sql("SELECT count(*)::text FROM t").await.expect("sql"),
        vec!["2"],
        "crash recovery kept the committed row"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_releases_the_keys_then_a_restart_adopts_the_data() {
    let mut env = one_member().await;
    env.members[0]
        .sql("CREATE TABLE t (id int); INSERT INTO t VALUES (7)")
        .await
        .expect("write");
    let postmaster = env.members[0].postmaster_pid().expect("postmaster");
    let sysid = env.etcd.get(&env.key("initialize")).await.expect("etcd");

    let agent = env.members[0].agent();
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(60))
        .expect("the agent exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        !pgwarden_tests::harness::process::pid_alive(postmaster),
        "postgres stopped with the agent"
    );
    assert_eq!(env.leader().await, None, "leader key deleted");
    assert_eq!(
        env.etcd.get(&env.key("members/pg0")).await.expect("etcd"),
        None,
        "member key deleted"
    );
    let log = env.members[0].log_text();
    assert!(log.contains("released the leader lock"), "{log}");

    // Same data directory: adopted, not re-initialised.
    env.members[0].restart().expect("restart");
    env.wait_for_leader(T).await;
    assert_eq!(
        env.members[0]
            .sql("SELECT id::text FROM t")
            .await
            .expect("sql"),
        vec!["7"]
    );
    assert_eq!(
        env.etcd.get(&env.key("initialize")).await.expect("etcd"),
        sysid
    );
    // The log is appended to across runs: initdb ran once, in the first run only.
    assert_eq!(
        env.members[0].log_text().matches("running initdb").count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_another_cluster_is_refused_and_left_untouched() {
    let mut env = one_member().await;
    // A second, independent cluster's data directory, created by plain initdb.
    let i = env.add_member("stranger");
    let stranger_data = env.members[i].data_dir();
    std::fs::create_dir_all(&env.members[i].dir).expect("dir");
    let mut initdb = std::process::Command::new("/usr/lib/postgresql/15/bin/initdb");
    initdb
        .arg("-D")
        .arg(&stranger_data)
        .arg("-U")
        .arg("postgres");
    if let Some(who) = pgwarden_tests::harness::run_as() {
        use std::os::unix::process::CommandExt;
        let _ = nix::unistd::chown(
            &env.members[i].dir,
            Some(nix::unistd::Uid::from_raw(who.uid)),
            Some(nix::unistd::Gid::from_raw(who.gid)),
        );
        initdb.uid(who.uid).gid(who.gid);
    }
    let out = initdb.output().expect("initdb runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let control_before =
        std::fs::read(stranger_data.join("global/pg_control")).expect("pg_control");

    env.start_member(i).expect("start");
    let status = env.members[i]
        .agent()
        .wait_exit(Duration::from_secs(60))
        .expect("the agent refuses and exits");
    assert_eq!(status.code(), Some(1));
    let log = env.members[i].log_text();
    assert!(
        log.contains("belongs to another cluster"),
        "clear refusal in the log: {log}"
    );
    assert_eq!(
        std::fs::read(stranger_data.join("global/pg_control")).expect("pg_control"),
        control_before,
        "the data directory is untouched"
    );
    assert!(!stranger_data.join("postgresql.base.conf").exists());
    assert_eq!(env.leader().await.as_deref(), Some("pg0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_postgres_directory_is_refused_and_left_untouched() {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    let i = env.add_member("pg0");
    let data = env.members[i].data_dir();
    std::fs::create_dir_all(&data).expect("dir");
    std::fs::write(data.join("precious.txt"), "do not delete").expect("write");
    env.start_member(i).expect("start");
    let status = env.members[i]
        .agent()
        .wait_exit(Duration::from_secs(60))
        .expect("the agent exits");
    assert_eq!(status.code(), Some(1));
    assert!(env.members[i].log_text().contains("refusing to touch it"));
    assert_eq!(
        std::fs::read_to_string(data.join("precious.txt")).expect("still there"),
        "do not delete"
    );
    assert_eq!(std::fs::read_dir(&data).expect("dir").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_parameters_and_restart_clears_pending_restart() {
    let mut env = one_member().await;
    let m = &mut env.members[0];
    m.set(
        "postgresql.parameters.work_mem",
        serde_yaml::Value::String("7MB".into()),
    );
    m.set(
        "postgresql.parameters.max_prepared_transactions",
        serde_yaml::Value::Number(7.into()),
    );
    m.write_config().expect("rewrite the config");
    let m = &env.members[0];
    let (code, body) = m
        .api_request("POST", "/reload", None)
        .await
        .expect("answers");
    assert_eq!((code, body.as_str()), (202, "reload scheduled"));
    wait_until("work_mem is reloaded", T, || async {
        m.sql("SHOW work_mem").await.is_ok_and(|v| v == vec!["7MB"])
    })
    .await;
    wait_until("a restart is reported as pending", T, || async {
        m.api_get("/patroni")
            .await
            .is_some_and(|(_, b)| b.contains("\"pending_restart\":true"))
    })
    .await;
    let (code, body) = m
        .api_request("POST", "/restart", None)
        .await
        .expect("answers");
    assert_eq!((code, body.as_str()), (200, "restarted successfully"));
    assert_eq!(
        m.sql("SHOW max_prepared_transactions").await.expect("sql"),
        vec!["7"]
    );
    wait_until("pending_restart is cleared", T, || async {
        m.api_get("/patroni")
            .await
            .is_some_and(|(_, b)| !b.contains("pending_restart"))
    })
    .await;
    assert_eq!(env.leader().await.as_deref(), Some("pg0"));
}

/// `/primary` (and `/leader`, `/read-write`) answer 200 only while postgres runs as a primary:
/// never during the bootstrap (the lock is taken only once it is done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_answers_200_only_while_postgres_takes_writes() {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd starts");
    let i = env.add_member("pg0");
    env.start_member(i).expect("agent starts");
    let m = &env.members[0];
    let mut saw_bootstrap = false;
    let deadline = std::time::Instant::now() + T;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no primary within {T:?}"
        );
        let leader_code = m.api_get("/leader").await.map(|(s, _)| s);
        let code = m.api_get("/primary").await.map(|(s, _)| s);
        let state = m
            .api_get("/patroni")
            .await
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
            .map(|j| j["state"].as_str().unwrap_or_default().to_owned());
        if state.as_deref() == Some("initializing new cluster") {
            saw_bootstrap = true;
        }
        if code == Some(200) {
            // The state cannot go back to bootstrapping: a 200 seen before `running` is a lie.
            m.sql("CREATE TABLE primary_probe (id int)")
                .await
                .expect("a primary that says 200 takes writes");
            break;
        }
        assert_ne!(
            leader_code,
            Some(200),
            "/leader said 200 before /primary (state {state:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_bootstrap, "the poll saw the bootstrap");
}

/// Issue 17: parameters the running major version does not have (Patroni's parameter tables)
/// are dropped with a warning naming the parameter and the version, so a configuration written
/// for another PostgreSQL version still starts: postgres refuses an unknown parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_of_other_major_versions_are_dropped_and_postgres_starts() {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    let i = env.add_member("pg0");
    let m = &mut env.members[i];
    // Removed in 15, removed in 14, added in 17; work_mem is kept.
    m.set(
        "bootstrap.dcs.postgresql.parameters.stats_temp_directory",
        "pg_stat_tmp".into(),
    );
    m.set(
        "bootstrap.dcs.postgresql.parameters.operator_precedence_warning",
        "off".into(),
    );
    m.set("postgresql.parameters.allow_alter_system", "on".into());
    m.set("postgresql.parameters.work_mem", "5MB".into());
    env.start_member(i).expect("agent starts");
    env.wait_for_leader(T).await;
    let m = &env.members[0];
    assert_eq!(
        m.sql("SHOW work_mem").await.expect("sql"),
        vec!["5MB".to_owned()]
    );
    let log = m.log_text();
    for expected in [
        "dropping parameter stats_temp_directory: PostgreSQL 15 does not have it (removed in PostgreSQL 15)",
        "dropping parameter operator_precedence_warning: PostgreSQL 15 does not have it (removed in PostgreSQL 14)",
        "dropping parameter allow_alter_system: PostgreSQL 15 does not have it (added in PostgreSQL 17)",
    ] {
        assert!(log.contains(expected), "{expected}\n{log}");
    }
    let conf = std::fs::read_to_string(m.data_dir().join("postgresql.conf")).expect("conf");
    assert!(!conf.contains("stats_temp_directory"), "{conf}");
}

/// `loop_wait` and `retry_timeout` changed with `PATCH /config` (edit-config) reach the etcd
/// client: it is rebuilt with the new HTTP/2 keepalive interval (`loop_wait` + 1 s) and request
/// timeout, and the member keeps its lease on the rebuilt client. Before, the client kept its
/// bootstrap values until the agent restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_config_timing_reaches_the_etcd_client() {
    let env = one_member().await;
    let m = &env.members[0];
    // The leader seeds the DCS `config` after its bootstrap; until then PATCH answers 503.
    wait_until("the DCS holds the configuration", T, || async {
        m.api_get("/config").await.map(|(s, _)| s) == Some(200)
    })
    .await;
    let (code, body) = m
        .api_request(
            "PATCH",
            "/config",
            Some(r#"{"loop_wait": 2, "retry_timeout": 4}"#),
        )
        .await
        .expect("PATCH /config answers");
    assert_eq!(code, 200, "{body}");
    wait_until(
        "the etcd client is rebuilt with the new timing",
        T,
        || async {
            m.log_text().lines().any(|l| {
                l.contains("etcd client rebuilt")
                    && l.contains("request_timeout=4s")
                    && l.contains("keepalive_interval=3s")
            })
        },
    )
    .await;
    // The rebuilt client carries the lease: the leader keeps its key over several ttl-long
    // stretches of renewals, and its member record keeps being written.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(env.leader().await.as_deref(), Some("pg0"));
    let log = m.log_text();
    assert!(!log.contains("the leader lease is lost"), "{log}");
}
