//! The REST API and metrics of a running member, configuration errors from the binary, and
//! Debian's unmodified `patronictl` against our etcd keys.

use std::process::Command;
use std::time::Duration;

use pgwarden_tests::harness::{agent_binary, wait_until, ClusterOptions, TestEnv};

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_endpoints_and_metrics_of_a_primary() {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    let i = env.add_member("pg0");
    env.start_member(i).expect("start");
    env.wait_for_leader(T).await;
    let m = &env.members[0];
    for (path, code) in [
        ("/primary", 200),
        ("/leader", 200),
        ("/master", 200),
        ("/replica", 503),
        ("/health", 200),
        ("/liveness", 200),
        ("/readiness", 200),
        ("/read-only", 200),
        ("/no-such-check", 503),
    ] {
        let got = m.api_get(path).await.map(|(s, _)| s);
        assert_eq!(got, Some(code), "GET {path}");
    }
    let (_, body) = m.api_get("/patroni").await.expect("answers");
    let j: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(j["state"], "running");
    assert_eq!(j["role"], "primary");
    assert_eq!(j["timeline"], 1);
    assert_eq!(j["server_version"].as_i64().map(|v| v / 10000), Some(15));
    assert!(j["xlog"]["location"].as_u64().is_some());
    assert_eq!(j["patroni"]["scope"], "test");
    assert_eq!(j["patroni"]["name"], "pg0");
    assert!(j["database_system_identifier"].as_str().is_some());

    let (code, metrics) = m.api_get("/metrics").await.expect("answers");
    assert_eq!(code, 200);
    for line in [
        "patroni_primary{scope=\"test\",name=\"pg0\"} 1",
        "patroni_replica{scope=\"test\",name=\"pg0\"} 0",
        "patroni_postgres_running{scope=\"test\",name=\"pg0\"} 1",
        "patroni_postgres_timeline{scope=\"test\",name=\"pg0\"} 1",
        "patroni_cluster_unlocked{scope=\"test\",name=\"pg0\"} 0",
    ] {
        assert!(metrics.contains(line), "missing {line}:\n{metrics}");
    }
    assert!(metrics.contains("patroni_postmaster_start_time{scope=\"test\",name=\"pg0\"} 1"));

    let (code, body) = m
        .api_request("POST", "/switchover", Some("{broken"))
        .await
        .expect("answers");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("invalid JSON"));
    let (code, body) = m
        .api_request("POST", "/reload", None)
        .await
        .expect("answers");
    assert_eq!((code, body.as_str()), (202, "reload scheduled"));
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(agent_binary())
        .args(args)
        .env_remove("PGWARDEN_NAME")
        .output()
        .expect("the binary runs")
}

#[test]
fn invalid_configuration_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "scope: s\nname: n\nrestapi: {listen: '127.0.0.1:8008'}\netcd3: {hosts: ['127.0.0.1:2379']}\nbootstrap: {dcs: {standby_cluster: {host: 10.0.0.1, port: 70000}}}\npostgresql: {listen: '127.0.0.1:5432', data_dir: /tmp/x, authentication: {superuser: {username: p}, replication: {username: r}}}\n",
            "bootstrap.dcs.standby_cluster.port",
        ),
        (
            "scope: s\nname: n\nrestapi: {listen: '127.0.0.1:8008'}\netcd3: {hosts: ['127.0.0.1:2379']}\nbootstrap: {dcs: {ttl: oops}}\n",
            "bootstrap.dcs.ttl",
        ),
        (
            "scope: s\nname: n\nrestapi: {listen: '127.0.0.1:8008'}\npostgresql: {listen: '127.0.0.1:5432', data_dir: /tmp/x, authentication: {superuser: {username: p}, replication: {username: r}}}\n",
            "etcd3",
        ),
    ];
    for (i, (yaml, path)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad{i}.yml"));
        std::fs::write(&file, yaml).expect("write");
        for args in [
            vec!["validate-config", file.to_str().expect("utf-8")],
            vec![file.to_str().expect("utf-8")],
        ] {
            let out = run(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(
                stderr.contains(&format!("`{path}`")),
                "{args:?} should name `{path}`: {stderr}"
            );
        }
    }
    let out = run(&["validate-config", "/nonexistent/patroni.yml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));

    // A cafile the client cannot use is refused here, not at the first call to a peer.
    let cafile = dir.path().join("ca.pem");
    std::fs::write(&cafile, "a key, not a certificate\n").expect("write");
    let file = dir.path().join("cafile.yml");
    std::fs::write(
        &file,
        format!(
            "scope: s\nname: n\nrestapi: {{listen: '127.0.0.1:8008', cafile: {}}}\netcd3: {{hosts: ['127.0.0.1:2379']}}\npostgresql: {{listen: '127.0.0.1:5432', data_dir: /tmp/x, authentication: {{superuser: {{username: p}}, replication: {{username: r}}}}}}\n",
            cafile.display()
        ),
    )
    .expect("write");
    let out = run(&["validate-config", file.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`restapi.cafile`") && stderr.contains("holds no PEM certificate"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patronictl_lists_the_member_as_leader() {
    if Command::new("patronictl").arg("--help").output().is_err() {
        pgwarden_tests::harness::missing_tool(
            "patronictl is not installed (scripts/install-deps.sh installs it)",
        );
        return;
    }
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    let i = env.add_member("pg0");
    env.start_member(i).expect("start");
    env.wait_for_leader(T).await;
    let ctl = env.dir.path().join("patronictl.yml");
    std::fs::write(
        &ctl,
        format!(
            "scope: test\nnamespace: /service/\netcd3:\n  hosts: ['{}']\n",
            env.etcd.endpoint()
        ),
    )
    .expect("write patronictl config");
    let mut last = String::new();
    for _ in 0..50 {
        let out = Command::new("patronictl")
            .arg("-c")
            .arg(&ctl)
            .arg("list")
            .output()
            .expect("patronictl runs");
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let row: Option<Vec<String>> = last
            .lines()
            .map(|l| {
                l.split('|')
                    .map(|c| c.trim().to_owned())
                    .collect::<Vec<_>>()
            })
            .find(|cells| cells.get(1).map(String::as_str) == Some("pg0"));
        // Columns: Member, Host, Role, State, TL, Lag in MB.
        if out.status.success()
            && row.is_some_and(|c| {
                c.get(3..6) == Some(&["Leader".into(), "running".into(), "1".into()][..])
            })
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("patronictl list did not show pg0 as a running Leader on timeline 1:\n{last}");
}

/// Each member also has `restapi.cafile`: pg0 the self-signed certificate itself, as curl and
/// patronictl accept it (rustls refuses it as is: `openssl req -x509` marks it as a CA), pg1
/// another certificate, which cannot verify pg0. A TLS failure is logged once, with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_over_tls_with_basic_auth_and_a_switchover_between_tls_members() {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    let (cert, key) = pgwarden_tests::harness::tls::self_signed(
        env.dir.path(),
        "api",
        "127.0.0.1",
        "IP:127.0.0.1",
    )
    .expect("certificate");
    let (other, _) = pgwarden_tests::harness::tls::self_signed(
        env.dir.path(),
        "other",
        "127.0.0.1",
        "IP:127.0.0.1",
    )
    .expect("certificate");
    use std::os::unix::fs::PermissionsExt;
    for f in [&cert, &key, &other] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    for (name, cafile) in [("pg0", &cert), ("pg1", &other)] {
        let i = env.add_member(name);
        let m = &mut env.members[i];
        m.set("restapi.certfile", cert.display().to_string().into());
        m.set("restapi.keyfile", key.display().to_string().into());
        m.set("restapi.cafile", cafile.display().to_string().into());
        m.set("restapi.authentication.username", "admin".into());
        m.set("restapi.authentication.password", "secret".into());
    }
    env.start_member(0).expect("start");
    env.wait_for_leader(T).await;
    env.start_member(1).expect("start");
    let replica = &env.members[1];
    pgwarden_tests::harness::wait_until("pg1 streams", T, || async {
        replica.api_get("/replica").await.map(|(s, _)| s) == Some(200)
    })
    .await;
    let record = env
        .etcd
        .get(&env.key("members/pg0"))
        .await
        .expect("etcd")
        .expect("member");
    assert!(record.contains("\"api_url\":\"https://"), "{record}");
    // Plain HTTP is not served on a TLS port.
    let plain =
        pgwarden_tests::harness::http_request("GET", env.members[0].api_port, "/patroni", None)
            .await;
    assert!(plain.is_none_or(|(s, _)| s != 200));
    // Write endpoints need the password.
    let unauthenticated = pgwarden_tests::harness::https_request(
        "POST",
        env.members[0].api_port,
        "/switchover",
        Some(r#"{"leader":"pg0","candidate":"pg1"}"#),
        None,
    )
    .await;
    assert_eq!(unauthenticated.map(|(s, _)| s), Some(401));
    // The leader checks the candidate over https before handing over.
    let (code, body) = env.members[0]
        .api_request(
            "POST",
            "/switchover",
            Some(r#"{"leader":"pg0","candidate":"pg1"}"#),
        )
        .await
        .expect("answers");
    assert_eq!(
        (code, body.as_str()),
        (200, "Successfully switched over to \"pg1\"")
    );

    // pg1 cannot verify pg0 with its cafile: no switchover back, and one log line saying why,
    // however many checks fail the same way.
    let pg0 = &env.members[0];
    pgwarden_tests::harness::wait_until("pg0 streams from pg1", T, || async {
        pg0.api_get("/replica").await.map(|(s, _)| s) == Some(200)
    })
    .await;
    for _ in 0..2 {
        let (code, body) = env.members[1]
            .api_request(
                "POST",
                "/switchover",
                Some(r#"{"leader":"pg1","candidate":"pg0"}"#),
            )
            .await
            .expect("answers");
        assert_eq!(code, 412, "{body}");
    }
    let log = env.members[1].log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("TLS with a member's REST API fails"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("that is not itself in restapi.cafile"),
        "{}",
        lines[0]
    );
}

/// 3,000 idle connections to the REST port of an agent that may open 1,024 files (systemd's
/// default soft limit): `GET /primary` is still answered. Before, the idle connections used up
/// the agent's descriptors and health checks waited in the accept queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_does_not_keep_health_checks_out() {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    let i = env.add_member("pg0");
    env.members[i].launcher = vec!["prlimit".into(), "--nofile=1024:1024".into(), "--".into()];
    env.start_member(i).expect("start");
    env.wait_for_leader(T).await;
    let m = &env.members[0];
    pgwarden_tests::harness::wait_until("pg0 answers /primary", T, || async {
        m.api_get("/primary").await.map(|(s, _)| s) == Some(200)
    })
    .await;
    let mut flood = Vec::new();
    for _ in 0..6 {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..500 {
            let port = m.api_port;
            batch.spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::net::TcpStream::connect(("127.0.0.1", port)),
                )
                .await
            });
        }
        while let Some(done) = batch.join_next().await {
            if let Ok(Ok(Ok(stream))) = done {
                flood.push(stream);
            }
        }
    }
    assert!(
        flood.len() > 1024,
        "only {} connections opened",
        flood.len()
    );
    assert_eq!(
        m.api_get("/primary").await.map(|(s, _)| s),
        Some(200),
        "GET /primary under {} idle connections",
        flood.len()
    );
    drop(flood);
    assert_eq!(m.api_get("/patroni").await.map(|(s, _)| s), Some(200));
}

#[test]
fn an_unknown_command_is_refused_not_read_as_a_configuration_file() {
    let out = run(&["topolgy"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("unknown command \"topolgy\"") && stderr.contains("topology"),
        "{stderr}"
    );
}

/// `pgwarden -c <ctl.yml> args` with `stdin` as its input: (success, stdout and stderr).
fn ctl(env: &TestEnv, args: &[&str], stdin: &str, vars: &[(&str, &str)]) -> (bool, String) {
    use std::io::Write;
    let config = env.dir.path().join("ctl.yml");
    std::fs::write(
        &config,
        format!(
            "scope: {}\nnamespace: /service/\netcd3:\n  hosts: ['{}']\n",
            env.options.scope,
            env.etcd.endpoint()
        ),
    )
    .expect("write the ctl config");
    let mut child = Command::new(agent_binary())
        .arg("-c")
        .arg(&config)
        .args(args)
        .envs(vars.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output().expect("the binary runs");
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

/// pg0 leads and pg1 streams from it (with a `replicatefrom` tag, shown by `topology`).
async fn leader_and_replica() -> TestEnv {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    for name in ["pg0", "pg1"] {
        let i = env.add_member(name);
        if name == "pg1" {
            env.members[i].set("tags.replicatefrom", "pg0".into());
        }
    }
    env.start_member(0).expect("start");
    env.wait_for_leader(T).await;
    env.start_member(1).expect("start");
    let replica = &env.members[1];
    pgwarden_tests::harness::wait_until("pg1 streams", T, || async {
        replica.api_get("/replica").await.map(|(s, _)| s) == Some(200)
            && replica.is_streaming_replica().await
    })
    .await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_topology_dsn_query_version_and_remove() {
    let env = leader_and_replica().await;
    let (pg0_port, pg1_port) = (env.members[0].pg_port, env.members[1].pg_port);

    let (ok, out) = ctl(&env, &["topology"], "", &[]);
    assert!(ok, "{out}");
    assert_eq!(
        table_row(&out, "pg0").and_then(|r| r.get(3).cloned()),
        Some("Leader".into()),
        "{out}"
    );
    assert!(table_row(&out, "+ pg1").is_some(), "{out}");

    let (ok, out) = ctl(&env, &["dsn"], "", &[]);
    assert_eq!(
        (ok, out.trim()),
        (true, format!("host=127.0.0.1 port={pg0_port}").as_str())
    );
    let (ok, out) = ctl(&env, &["dsn", "--role", "replica"], "", &[]);
    assert_eq!(
        (ok, out.trim()),
        (true, format!("host=127.0.0.1 port={pg1_port}").as_str())
    );
    let (ok, out) = ctl(&env, &["dsn", "-m", "pg1", "-r", "any"], "", &[]);
    assert!(!ok && out.contains("mutually exclusive"), "{out}");

    let (ok, out) = ctl(
        &env,
        &[
            "query",
            "-U",
            "postgres",
            "--password",
            "-c",
            "SELECT 6 * 7 AS answer",
        ],
        "su-secret\n",
        &[],
    );
    assert!(ok && out.ends_with("answer\n42\n"), "{out}");
    let (ok, out) = ctl(
        &env,
        &[
            "query",
            "-r",
            "replica",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "--format",
            "json",
            "-c",
            "SELECT pg_is_in_recovery() AS standby",
        ],
        "",
        &[("PGPASSWORD", "su-secret")],
    );
    assert!(ok && out.contains(r#"[{"standby":"t"}]"#), "{out}");
    let (ok, out) = ctl(
        &env,
        &[
            "query",
            "-m",
            "pg0",
            "-U",
            "postgres",
            "-c",
            "SELECT * FROM no_such_table",
        ],
        "",
        &[("PGPASSWORD", "su-secret")],
    );
    assert!(!ok && out.contains("ERROR, SQLSTATE: 42P01"), "{out}");

    let (ok, out) = ctl(&env, &["version"], "", &[]);
    assert!(ok && out.starts_with("pgwarden version "), "{out}");
    for name in ["pg0", "pg1"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("{name}: pgwarden "))
                    && l.contains(" PostgreSQL 15.")),
            "{out}"
        );
    }

    // remove: a wrong answer changes nothing; the full dialogue wipes every key.
    let (ok, out) = ctl(&env, &["remove", "test"], "nope\n", &[]);
    assert!(
        !ok && out.contains("Cluster names specified do not match"),
        "{out}"
    );
    assert!(env.leader().await.is_some());
    // Frozen agents write nothing while the keys go.
    for m in &env.members {
        m.process.as_ref().expect("started").sigstop();
    }
    let (ok, out) = ctl(
        &env,
        &["remove", "test"],
        "test\nYes I am aware\npg0\n",
        &[],
    );
    assert!(
        ok && out.contains("please type: \"Yes I am aware\"")
            && out.contains("Please specify the leader name to continue"),
        "{out}"
    );
    let left = env.etcd.get_prefix("/service/test/").await.expect("etcd");
    assert!(left.is_empty(), "{left:?}");
    for m in &env.members {
        m.process.as_ref().expect("started").sigcont();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_a_paused_replays_lag_and_pending_restarts() {
    let env = leader_and_replica().await;
    let replica = &env.members[1];
    // A replica whose replay is paused still receives: it must not look caught up.
    replica
        .sql("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause replay");
    env.members[0]
        .sql("CREATE TABLE filler AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 40000) g")
        .await
        .expect("write WAL");
    let mut last = String::new();
    pgwarden_tests::harness::wait_until("list shows pg1's replay lag", T, || {
        let (ok, out) = ctl(&env, &["list", "--format", "json"], "", &[]);
        last = out.clone();
        async move {
            let rows: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            ok && rows.as_array().is_some_and(|rows| {
                rows.iter().any(|r| {
                    r["member"] == "pg1"
                        && r["replay_lag"].as_u64().unwrap_or(0) > 1024 * 1024
                        && r["receive_lag"].as_u64().is_some_and(|l| l < 1024 * 1024)
                })
            })
        }
    })
    .await;
    let (ok, out) = ctl(&env, &["list"], "", &[]);
    let row = table_row(&out, "pg1").unwrap_or_default();
    // Member, Host, Role, State, TL, Receive LSN, Lag, Replay LSN, Lag.
    assert!(
        ok && row.get(9).is_some_and(|lag| lag != "0" && !lag.is_empty()),
        "{out}\n{last}"
    );
    replica
        .sql("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume replay");

    // A restart-only parameter shows up in the Pending restart column.
    let (ok, out) = ctl(
        &env,
        &["edit-config", "--pg", "max_connections=60", "--force"],
        "",
        &[],
    );
    assert!(ok, "{out}");
    pgwarden_tests::harness::wait_until("list shows the pending restart", T, || {
        let (ok, out) = ctl(&env, &["list"], "", &[]);
        async move {
            ok && out.contains(" Pending restart ")
                && ["pg0", "pg1"].iter().all(|m| {
                    table_row(&out, m).is_some_and(|r| r.get(10).map(String::as_str) == Some("*"))
                })
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_and_dateformat_lay_out_the_agent_lines() {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    let i = env.add_member("pg0");
    env.members[i].set(
        "log.format",
        "%(asctime)s %(levelname)-8s pid=%(process)d %(message)s".into(),
    );
    env.members[i].set("log.dateformat", "%Y/%m/%d %H.%M.%S".into());
    env.start_member(i).expect("start");
    env.wait_for_leader(T).await;
    let pid = env.members[0].agent().pid();
    let log = env.members[0].log_text();
    // `2026/12/04 17.05.09 INFO     pid=4242 ...`
    let patroni_layout = |line: &str| {
        let b = line.as_bytes();
        line.len() > 20
            && b[4] == b'/'
            && b[7] == b'/'
            && b[13] == b'.'
            && b[16] == b'.'
            && line[19..].starts_with(&format!(" INFO     pid={pid} "))
    };
    assert!(log.lines().any(patroni_layout), "{log}");
}

/// Issue 17: `log.level`, `log.format` and `log.dateformat` take effect on reload
/// (`POST /reload` and SIGHUP), as Patroni's logger reloads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_settings_are_applied_on_reload() {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    let i = env.add_member("pg0");
    // No RUST_LOG override: `log.level` decides.
    env.members[i].env.push(("RUST_LOG".into(), String::new()));
    env.members[i].set("log.level", "INFO".into());
    env.start_member(i).expect("start");
    env.wait_for_leader(T).await;
    // POST /reload: a new layout at once.
    env.members[0].set("log.format", "RELOADED %(levelname)s %(message)s".into());
    env.members[0].write_config().expect("write");
    let m = &env.members[0];
    let got = m.api_request("POST", "/reload", None).await;
    assert_eq!(got.map(|(s, _)| s), Some(202));
    pgwarden_tests::harness::wait_until("the reloaded layout is used", T, || async {
        m.log_text()
            .lines()
            .any(|l| l == "RELOADED INFO local configuration reloaded")
    })
    .await;

    // SIGHUP: level WARNING, another layout. INFO lines stop, warnings use the new layout.
    env.members[0].set("log.format", "HUP %(levelname)s %(message)s".into());
    env.members[0].set("log.level", "WARNING".into());
    env.members[0].write_config().expect("write");
    env.members[0]
        .agent()
        .signal(nix::sys::signal::Signal::SIGHUP);
    pgwarden_tests::harness::wait_until("the SIGHUP is handled", T, || async {
        env.members[0]
            .log_text()
            .contains("RELOADED INFO SIGHUP: reloading the configuration")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // An invalid file is refused with a warning, in the new layout.
    std::fs::write(env.members[0].config_path(), "ttl: [not, a, config\n").expect("write");
    let m = &env.members[0];
    let got = m.api_request("POST", "/reload", None).await;
    assert_eq!(got.map(|(s, _)| s), Some(400));
    pgwarden_tests::harness::wait_until("the warning uses the SIGHUP layout", T, || async {
        m.log_text()
            .lines()
            .any(|l| l.starts_with("HUP WARNING reload refused"))
    })
    .await;
    let log = env.members[0].log_text();
    let mark = "RELOADED INFO SIGHUP: reloading the configuration";
    let after: Vec<&str> = log[log.rfind(mark).expect("the mark")..]
        .lines()
        .skip(1)
        .collect();
    assert!(
        !after
            .iter()
            .any(|l| l.contains(" INFO ") || l.contains("RELOADED ")),
        "INFO lines after the reload to WARNING: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_with_the_same_name_is_refused_at_critical() {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    let i = env.add_member("pg0");
    env.start_member(i).expect("start");
    env.wait_for_leader(T).await;
    // Another agent named pg0, even on pg0's REST port: refused, and pg0 keeps running.
    let j = env.add_member("pg0-again");
    let api_port = env.members[0].api_port;
    let m = &mut env.members[j];
    m.set("name", "pg0".into());
    m.set("restapi.listen", format!("127.0.0.1:{api_port}").into());
    env.start_member(j).expect("start");
    let status = env.members[j]
        .agent()
        .wait_exit(Duration::from_secs(30))
        .expect("the duplicate exits");
    assert!(!status.success());
    let log = env.members[j].log_text();
    assert!(
        log.lines().any(|l| l.contains("CRITICAL")
            && l.contains("Can't start; there is already a node named 'pg0' running")),
        "{log}"
    );
    assert!(env.members[0].agent().is_running());
    assert_eq!(env.leader().await.as_deref(), Some("pg0"));
    assert_eq!(
        env.members[0].api_get("/primary").await.map(|(s, _)| s),
        Some(200)
    );
}

/// Patroni 4.1's `postgres0.yml`, with only the addresses, paths and DCS section (`etcd3`)
/// changed for this machine: `wal_keep_segments` (renamed `wal_keep_size` in PostgreSQL 13),
/// the pre-4.0 `master_start_timeout`, `pg_hba` in `bootstrap.dcs`, tags written as strings.
fn patroni_sample(m: &pgwarden_tests::harness::Member, etcd: &str, bin: &str) -> String {
    format!(
        r#"
scope: batman
namespace: /service/
name: {name}

restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}

etcd3:
  host: {etcd}

bootstrap:
  dcs:
    ttl: 30
    loop_wait: 10
    retry_timeout: 10
    maximum_lag_on_failover: 1048576
    master_start_timeout: 300
    postgresql:
      use_pg_rewind: true
      pg_hba:
      - local all all trust
      - host replication replicator 127.0.0.1/32 md5
      - host all all 0.0.0.0/0 md5
      parameters:
        wal_keep_segments: 100
        max_connections: 50
  initdb:
  - encoding: UTF8
  - data-checksums

postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {dir}/data
  bin_dir: {bin}
  pgpass: {dir}/pgpass0
  authentication:
    replication:
      username: replicator
      password: rep-pass
    superuser:
      username: postgres
      password: su-secret
    rewind:
      username: rewind_user
      password: rewind_password
  parameters:
    unix_socket_directories: '..'

tags:
  nofailover: "false"
  failover_priority: "1"
  noloadbalance: false
  clonefrom: "true"
  nosync: false
  nostream: false
"#,
        name = m.name,
        api = m.api_port,
        pg = m.pg_port,
        dir = m.dir.display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patroni_sample_configuration_starts_unchanged_with_tls_from_the_environment() {
    let mut env = TestEnv::start(ClusterOptions {
        scope: "batman".into(),
        ..Default::default()
    })
    .await
    .expect("etcd");
    let (cert, key) = pgwarden_tests::harness::tls::self_signed(
        env.dir.path(),
        "api",
        "127.0.0.1",
        "IP:127.0.0.1",
    )
    .expect("certificate");
    // Readable by the agents' user.
    use std::os::unix::fs::PermissionsExt;
    for f in [&cert, &key] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let i = env.add_member("postgresql0");
    let bin = std::env::var("PGWARDEN_PG_BIN_DIR")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    let yaml = patroni_sample(&env.members[i], &env.etcd.endpoint(), &bin);
    let m = &mut env.members[i];
    m.config = serde_yaml::from_str(&yaml).expect("the sample is YAML");
    // Patroni's variables for the REST API's TLS, as a container image sets them.
    for (k, v) in [
        ("PATRONI_RESTAPI_CERTFILE", cert.display().to_string()),
        ("PATRONI_RESTAPI_KEYFILE", key.display().to_string()),
        ("PATRONI_RESTAPI_CAFILE", cert.display().to_string()),
        ("PATRONI_RESTAPI_VERIFY_CLIENT", "none".into()),
    ] {
        m.env.push((k.into(), v));
    }
    env.start_member(i).expect("start");
    let m = &env.members[0];
    // The harness's own wait asks /primary over http; the API serves https here.
    pgwarden_tests::harness::wait_until("a writable leader", T, || async {
        env.leader().await.as_deref() == Some("postgresql0")
            && m.sql("SELECT pg_is_in_recovery()::text")
                .await
                .is_ok_and(|r| r == vec!["false"])
    })
    .await;
    assert_eq!(
        m.sql("SHOW wal_keep_size").await.expect("sql"),
        vec!["1600MB"],
        "wal_keep_segments 100 became wal_keep_size on PostgreSQL 15"
    );
    let key = env.key("members/postgresql0");
    pgwarden_tests::harness::wait_until("the member record is written", T, || async {
        env.etcd
            .get(&key)
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.contains("\"state\":\"running\""))
    })
    .await;
    let record: serde_json::Value = serde_json::from_str(
        &env.etcd
            .get(&key)
            .await
            .expect("etcd")
            .expect("member record"),
    )
    .expect("JSON");
    assert_eq!(
        record["tags"],
        serde_json::json!({"nofailover": "false", "failover_priority": "1", "clonefrom": "true"}),
        "tags are published as written"
    );
    assert_eq!(
        record["api_url"],
        format!("https://127.0.0.1:{}/patroni", m.api_port)
    );
    let (code, body) =
        pgwarden_tests::harness::https_request("GET", m.api_port, "/patroni", None, None)
            .await
            .expect("the API answers over https");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"clonefrom\":\"true\""), "{body}");
    let config = env
        .etcd
        .get(&env.key("config"))
        .await
        .expect("etcd")
        .expect("config");
    assert!(config.contains("\"primary_start_timeout\":300"), "{config}");
    assert!(
        !m.log_text().contains("` ignored"),
        "nothing of the sample is ignored: {}",
        m.log_tail(40)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inconsistent_timeouts_are_adjusted_bad_patches_refused_and_a_bad_dcs_value_costs_only_itself(
) {
    let mut env = TestEnv::start(ClusterOptions {
        ttl: 20,
        loop_wait: 2,
        retry_timeout: 10,
        ..Default::default()
    })
    .await
    .expect("etcd");
    let i = env.add_member("pg0");
    env.start_member(i).expect("start");
    assert_eq!(env.wait_for_leader(T).await, "pg0");
    let m = &env.members[0];
    let log = m.log_text();
    assert!(
        log.contains("adjusted as Patroni does: loop_wait = 1, retry_timeout = 9"),
        "{}",
        m.log_tail(40)
    );

    for (patch, key) in [
        (r#"{"ttl":"abc"}"#, "`ttl`"),
        (r#"{"ttl":-5}"#, "`ttl`"),
        (r#"{"ttl":0}"#, "`ttl`"),
        (r#"{"synchronous_mode":"sometimes"}"#, "`synchronous_mode`"),
    ] {
        let (code, body) = m
            .api_request("PATCH", "/config", Some(patch))
            .await
            .expect("the API answers");
        assert_eq!(code, 400, "{patch}: {body}");
        assert!(body.contains(key), "{patch}: {body}");
    }
    // The leader seeds `config` in the cycle after it took the lock, which the test may beat.
    wait_until("the leader seeded `config`", T, || async {
        env.etcd
            .get(&env.key("config"))
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await;
    let config = env
        .etcd
        .get(&env.key("config"))
        .await
        .expect("etcd")
        .expect("config");
    assert!(
        !config.contains("abc") && !config.contains("sometimes"),
        "{config}"
    );

    // One invalid value in the key; the change next to it still applies.
    env.etcd
        .put(
            &env.key("config"),
            r#"{"ttl":20,"loop_wait":"soon","retry_timeout":9,"postgresql":{"use_pg_rewind":true,"parameters":{"max_connections":50,"shared_buffers":"16MB","work_mem":"7MB"}}}"#,
        )
        .await
        .expect("etcd put");
    pgwarden_tests::harness::wait_until("work_mem from the DCS applies", T, || async {
        m.sql("SHOW work_mem").await.is_ok_and(|r| r == vec!["7MB"])
    })
    .await;
    assert!(
        m.log_text().contains("`config.loop_wait`"),
        "the invalid value is named: {}",
        m.log_tail(40)
    );
}
