//! Three members on real etcd and PostgreSQL 15 with faults injected for real: kill -9, SIGSTOP,
//! a cut etcd connection. A writer records every acknowledged write and the split-brain checker
//! runs through each scenario.

use std::time::Duration;

use pgwarden_tests::harness::proxy::TcpProxy;
use pgwarden_tests::harness::writer::{assert_no_split_brain, Writer, CREATE_TABLE};
use pgwarden_tests::harness::{wait_until, ClusterOptions, TestEnv};

const T: Duration = Duration::from_secs(90);

/// Starts three members (optionally each reaching etcd through its own proxy) and waits until
/// both replicas stream from the leader.
async fn three_members(options: ClusterOptions, proxied: bool) -> (TestEnv, Vec<TcpProxy>) {
    let mut env = TestEnv::start(options).await.expect("etcd");
    let mut proxies = Vec::new();
    for name in ["pg0", "pg1", "pg2"] {
        let i = env.add_member(name);
        if proxied {
            let proxy = TcpProxy::start(env.etcd.endpoint()).await.expect("proxy");
            env.members[i].set(
                "etcd3.hosts",
                serde_yaml::Value::Sequence(vec![proxy.endpoint().into()]),
            );
            proxies.push(proxy);
        }
    }
    for i in 0..3 {
        env.start_member(i).expect("start");
    }
    let leader = env.wait_for_leader(T).await;
    env.wait_for_streaming(&leader, 2, T).await;
    (env, proxies)
}

async fn start_writer(env: &TestEnv, leader: &str) -> Writer {
    let m = env
        .members
        .iter()
        .find(|m| m.name == leader)
        .expect("leader");
    m.sql(CREATE_TABLE).await.expect("create the writer table");
    Writer::start(env.writer_targets())
}

/// Waits until a leader other than `old` answers and accepts writes.
async fn wait_for_new_leader(env: &TestEnv, old: &str) -> String {
    let mut found = String::new();
    let deadline = std::time::Instant::now() + T;
    while std::time::Instant::now() < deadline {
        if let Some(l) = env.leader().await.filter(|l| l != old) {
            let m = env.members.iter().find(|m| m.name == l).expect("member");
            if m.sql("SELECT 1").await.is_ok()
                && m.sql("SELECT pg_is_in_recovery()::text").await.ok()
                    == Some(vec!["false".into()])
            {
                found = l;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!found.is_empty(), "no new leader replaced {old}");
    found
}

async fn wait_for_replica(env: &TestEnv, name: &str) {
    let m = env.members.iter().find(|m| m.name == name).expect("member");
    wait_until(
        &format!("{name} runs as a streaming replica"),
        T,
        || async { m.api_get("/replica").await.map(|(s, _)| s) == Some(200) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_bootstrap_and_both_replicas_stream() {
    let (env, _) = three_members(ClusterOptions::default(), false).await;
    let leader = env.leader().await.expect("leader");
    for m in env.members.iter().filter(|m| m.name != leader) {
        wait_for_replica(&env, &m.name).await;
        let (_, body) = m.api_get("/patroni").await.expect("answers");
        let j: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(j["role"], "replica");
        assert_eq!(j["replication_state"], "streaming");
    }
    // One physical slot per replica on the leader.
    let l = env
        .members
        .iter()
        .find(|m| m.name == leader)
        .expect("leader");
    let slots = l
        .sql("SELECT slot_name FROM pg_replication_slots WHERE active ORDER BY 1")
        .await
        .expect("sql");
    assert_eq!(slots.len(), 2, "{slots:?}");
}

/// Patroni claims `initialize` first and takes the leader lock only once the bootstrap is done
/// (`post_bootstrap`): the lock never names a member whose postgres does not run yet. The other
/// members wait on the claim; a bootstrap slower than `ttl + 2·loop_wait` keeps it while its
/// member record says "initializing new cluster", so nobody bootstraps a second cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_is_taken_after_bootstrap_and_a_slow_bootstrap_keeps_its_claim() {
    let options = ClusterOptions::default();
    // The abandoned-claim rule would withdraw an unfinished claim after ttl + 2·loop_wait.
    let abandon_after = Duration::from_secs((options.ttl + 2 * options.loop_wait).into());
    let mut env = TestEnv::start(options).await.expect("etcd");
    let p0 = env.add_member("pg0");
    let p1 = env.add_member("pg1");
    env.members[p0].wrap_pg_bin_dir().expect("wrappers");
    env.members[p0]
        .delay_tool("initdb", abandon_after.as_secs() + 8)
        .expect("slow initdb");
    env.start_member(p0).expect("start pg0");
    let initialize = env.key("initialize");
    wait_until("pg0 claims the bootstrap", T, || async {
        env.etcd.get(&initialize).await.ok().flatten().as_deref() == Some("")
    })
    .await;
    let claimed_at = std::time::Instant::now();
    env.start_member(p1).expect("start pg1");
    let deadline = claimed_at + T;
    let mut pg0_said_bootstrapping = false;
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "pg0 took no lock within {T:?}"
        );
        let state = |i: usize| {
            let m = &env.members[i];
            async move {
                m.api_get("/patroni")
                    .await
                    .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
                    .map(|j| j["state"].as_str().unwrap_or_default().to_owned())
            }
        };
        if state(p0).await.as_deref() == Some("initializing new cluster") {
            pg0_said_bootstrapping = true;
        }
        assert_ne!(
            state(p1).await.as_deref(),
            Some("initializing new cluster"),
            "pg1 bootstrapped a second cluster while pg0's bootstrap ran"
        );
        if let Some(leader) = env.leader().await {
            assert_eq!(
                leader, "pg0",
                "only the bootstrapping member takes the lock"
            );
            let primary = env.members[p0]
                .sql("SELECT pg_is_in_recovery()::text")
                .await
                .ok();
            assert_eq!(
                primary,
                Some(vec!["false".to_owned()]),
                "the lock was taken before the bootstrapped postgres ran as a primary"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(pg0_said_bootstrapping, "pg0 published its bootstrap");
    assert!(
        claimed_at.elapsed() > abandon_after,
        "the bootstrap outlasted ttl + 2·loop_wait ({:?})",
        claimed_at.elapsed()
    );
    wait_for_replica(&env, "pg1").await;
    let sysid = env.etcd.get(&initialize).await.ok().flatten();
    assert!(
        sysid
            .as_deref()
            .is_some_and(|s| s.len() >= 10 && s.bytes().all(|b| b.is_ascii_digit())),
        "`initialize` holds the system identifier: {sysid:?}"
    );
    assert!(
        !env.members[p1].log_text().contains("withdrawing the claim"),
        "pg1 withdrew a live bootstrap claim"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_leader_fails_over_once_and_the_old_leader_rejoins_with_rewind() {
    let (mut env, _) = three_members(ClusterOptions::default(), false).await;
    let old = env.leader().await.expect("leader");
    let writer = start_writer(&env, &old).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    env.member(&old).kill9_with_postmaster();
    let new = wait_for_new_leader(&env, &old).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    env.member(&old).restart().expect("restart the old leader");
    wait_for_replica(&env, &old).await;
    let acks = writer.stop().await;
    assert_no_split_brain(&acks);
    assert!(
        acks.iter().any(|a| a.member == new),
        "writes resumed on the new leader {new}"
    );
    assert_eq!(
        env.leader().await.as_deref(),
        Some(new.as_str()),
        "exactly one new leader"
    );
    let log = env.member(&old).log_text();
    assert!(
        log.contains("running pg_rewind"),
        "the old leader was rewound"
    );
}

/// `member_slots_ttl` (Patroni 4): the leader publishes the member slots it keeps as
/// `retain_slots` in `status`, its own included, and a new leader keeps those of members whose
/// keys are gone. The killed leader comes back to a slot that is already there, instead of
/// `replication slot "pg0" does not exist` and postgres' 5 s retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_finds_its_slot_on_the_new_leader_when_it_comes_back() {
    let (mut env, _) = three_members(ClusterOptions::default(), false).await;
    let old = env.leader().await.expect("leader");
    let status_lists = |raw: Option<String>, slot: &str| {
        raw.and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|j| j["retain_slots"].as_array().cloned())
            .is_some_and(|a| a.iter().any(|v| v == slot))
    };
    wait_until(
        "the leader lists its own slot in retain_slots",
        T,
        || async { status_lists(env.etcd.get(&env.key("status")).await.ok().flatten(), &old) },
    )
    .await;

    env.member(&old).kill9_with_postmaster();
    let new = wait_for_new_leader(&env, &old).await;
    let member_key = env.key(&format!("members/{old}"));
    wait_until(
        &format!("{old}'s member key expired, its slot kept on {new} and in retain_slots"),
        T,
        || async {
            let gone = env.etcd.get(&member_key).await.is_ok_and(|v| v.is_none());
            let listed = status_lists(env.etcd.get(&env.key("status")).await.ok().flatten(), &old);
            let slot = env
                .members
                .iter()
                .find(|m| m.name == new)
                .expect("new leader")
                .sql(&format!(
                    "SELECT slot_name FROM pg_replication_slots WHERE slot_name = '{old}'"
                ))
                .await
                .is_ok_and(|r| r.len() == 1);
            gone && listed && slot
        },
    )
    .await;

    env.member(&old).restart().expect("restart the old leader");
    wait_for_replica(&env, &old).await;
    let new_leader = env
        .members
        .iter()
        .find(|m| m.name == new)
        .expect("new leader");
    wait_until(
        &format!("{old} streams through its slot on {new}"),
        T,
        || async {
            new_leader
                .sql(&format!(
                    "SELECT active::text FROM pg_replication_slots WHERE slot_name = '{old}'"
                ))
                .await
                .is_ok_and(|r| r == vec!["true"])
        },
    )
    .await;
}

/// The physical slots on `member`, sorted.
async fn physical_slots(env: &TestEnv, member: &str) -> Option<Vec<String>> {
    env.members
        .iter()
        .find(|m| m.name == member)
        .expect("member")
        .sql("SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots WHERE slot_type = 'physical'")
        .await
        .ok()
        .map(|rows| {
            rows.first()
                .map(|r| r.split(',').map(str::to_owned).collect())
                .unwrap_or_default()
        })
}

/// Patroni's `slots` (its permanent_slots scenario, physical part) and `ignore_slots`: the
/// leader creates the permanent slots, drops a stray slot but not an ignored one. As Patroni 4
/// does with `member_slots_ttl`, each replica keeps the permanent slots and one slot per other
/// member (the leader's too), advanced to the positions the leader publishes in `status`, so a
/// new leader after a failover has them all at once, the old leader's included. A logical
/// entry without its plugin is refused with 400 (logical slots themselves: `logical_slots.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_slots_are_on_every_leader_and_ignored_slots_are_left_alone() {
    let (mut env, _) = three_members(ClusterOptions::default(), false).await;
    let old = env.leader().await.expect("leader");
    let leader = env.members.iter().find(|m| m.name == old).expect("leader");
    let (code, text) = leader
        .api_request(
            "PATCH",
            "/config",
            Some(
                r#"{"slots": {"test_physical": 0, "typed": {"type": "physical"}},
                    "ignore_slots": [{"name": "external", "type": "physical"}]}"#,
            ),
        )
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");
    let (code, text) = leader
        .api_request(
            "PATCH",
            "/config",
            Some(r#"{"slots": {"lg": {"type": "logical", "database": "postgres"}}}"#),
        )
        .await
        .expect("answers");
    assert!(code == 400 && text.contains("slots.lg"), "{code} {text}");

    let has = |slots: &Option<Vec<String>>, names: &[&str]| {
        slots
            .as_ref()
            .is_some_and(|s| names.iter().all(|n| s.iter().any(|x| x == n)))
    };
    wait_until(&format!("{old} has the permanent slots"), T, || async {
        has(
            &physical_slots(&env, &old).await,
            &["test_physical", "typed"],
        )
    })
    .await;
    leader
        .sql("SELECT pg_create_physical_replication_slot('stray'); SELECT pg_create_physical_replication_slot('external')")
        .await
        .expect("slots created by hand");
    wait_until("the stray slot is dropped", T, || async {
        physical_slots(&env, &old)
            .await
            .is_some_and(|s| !s.iter().any(|x| x == "stray"))
    })
    .await;
    let slots = physical_slots(&env, &old).await;
    assert!(
        has(&slots, &["external", "test_physical", "typed"]),
        "the ignored and the permanent slots stay: {slots:?}"
    );

    let names: Vec<String> = env.members.iter().map(|m| m.name.clone()).collect();
    let written = leader
        .sql("CREATE TABLE slot_probe AS SELECT 1 AS x; SELECT pg_current_wal_lsn()::text")
        .await
        .expect("a write on the leader");
    let written = written.last().cloned().expect("an LSN");
    for replica in names.iter().filter(|n| **n != old) {
        let others: Vec<&str> = names
            .iter()
            .filter(|n| *n != replica)
            .map(String::as_str)
            .collect();
        wait_until(
            &format!("{replica} keeps the permanent slots and those of {others:?}"),
            T,
            || async {
                let slots = physical_slots(&env, replica).await;
                has(&slots, &["test_physical", "typed"]) && has(&slots, &others)
            },
        )
        .await;
        let member = env.member(replica);
        wait_until(
            &format!("{replica}'s slot for the leader is advanced past {written}"),
            T,
            || async {
                member
                    .sql(&format!(
                        "SELECT (restart_lsn >= '{written}')::text FROM pg_replication_slots WHERE slot_name = '{old}'"
                    ))
                    .await
                    .ok()
                    == Some(vec!["true".to_owned()])
            },
        )
        .await;
    }

    env.member(&old).kill9_with_postmaster();
    let new = wait_for_new_leader(&env, &old).await;
    wait_until(
        &format!("the new leader {new} has the permanent slots and one for {old}"),
        T,
        || async {
            has(
                &physical_slots(&env, &new).await,
                &["test_physical", "typed", old.as_str()],
            )
        },
    )
    .await;
}

/// The port a member's WAL receiver streams from, and its slot, if it streams.
async fn stream_source(env: &TestEnv, name: &str) -> Option<(u16, String)> {
    env.members
        .iter()
        .find(|m| m.name == name)
        .expect("member")
        .streaming_from()
        .await
}

/// Patroni's `replicatefrom` and `clonefrom` tags: pg2 (`replicatefrom: pg1`) is cloned from
/// pg1 (`clonefrom: true`) and streams from it through a slot pg1 keeps, while the leader
/// keeps pg2's slot inactive and advances it to pg2's position; with pg1 gone pg2 streams from
/// the leader through that slot, and from pg1 again once pg1 is back. pg1 is `nofailover`:
/// it keeps no logical slot, but runs with `hot_standby_feedback` for pg2, which does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicatefrom_member_cascades_and_falls_back_to_the_leader() {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    for name in ["pg0", "pg1", "pg2"] {
        let i = env.add_member(name);
        let m = &mut env.members[i];
        m.set_permanent_slots("cdc: {type: logical, database: postgres, plugin: test_decoding}");
    }
    env.members[1].set("tags.clonefrom", true.into());
    env.members[1].set("tags.nofailover", true.into());
    env.members[2].set("tags.replicatefrom", "pg1".into());
    env.start_member(0).expect("start pg0");
    let leader = env.wait_for_leader(T).await;
    assert_eq!(leader, "pg0");
    env.start_member(1).expect("start pg1");
    env.wait_for_streaming("pg0", 1, T).await;
    // pg2 clones from pg1 only once pg1's member key says it runs (a clean-clone CI run started
    // pg2 while the key still said otherwise, and pg2 cloned the leader).
    let pg1_key = env.key("members/pg1");
    wait_until("pg1's member key says it runs", T, || async {
        env.etcd
            .get(&pg1_key)
            .await
            .ok()
            .flatten()
            .is_some_and(|v| v.contains("\"state\":\"running\"") && v.contains("clonefrom"))
    })
    .await;
    env.start_member(2).expect("start pg2");
    let (pg0_port, pg1_port) = (env.members[0].pg_port, env.members[1].pg_port);
    wait_until("pg2 streams from pg1 through its slot", T, || async {
        stream_source(&env, "pg2").await == Some((pg1_port, "pg2".to_owned()))
    })
    .await;
    assert!(
        log_of(&env, "pg2").contains("leader=\"pg1\"")
            || log_of(&env, "pg2").contains("leader=pg1"),
        "pg2 was cloned from pg1:\n{}",
        log_of(&env, "pg2")
    );
    wait_until("the leader keeps slots for pg1 and pg2", T, || async {
        physical_slots(&env, "pg0")
            .await
            .is_some_and(|s| s.iter().any(|x| x == "pg1") && s.iter().any(|x| x == "pg2"))
    })
    .await;
    let written_at = env.members[0]
        .sql("CREATE TABLE c (v int); INSERT INTO c VALUES (1); SELECT pg_current_wal_lsn()::text")
        .await
        .expect("write on the leader")[0]
        .clone();
    wait_until("the row reaches pg2 through pg1", T, || async {
        env.members[2].sql("SELECT count(*) FROM c").await.ok() == Some(vec!["1".to_owned()])
    })
    .await;
    // Nobody streams from pg2's slot on the leader: the leader advances it to the position
    // pg2 reports (Patroni 4 with `member_slots_ttl`), so it holds no more WAL than pg2 needs.
    let advanced = format!(
        "SELECT (NOT active AND restart_lsn >= '{written_at}')::text \
         FROM pg_replication_slots WHERE slot_name = 'pg2'"
    );
    wait_until(
        "the leader advances pg2's slot past the write",
        T,
        || async { env.members[0].sql(&advanced).await.ok() == Some(vec!["true".to_owned()]) },
    )
    .await;
    // pg2 keeps a copy of the permanent logical slot; its catalog_xmin reaches the leader only
    // through pg1, which keeps no logical slot itself (`nofailover`) but passes the feedback on
    // (Patroni's `should_enforce_hot_standby_feedback`).
    wait_until("pg2 has its copy of the logical slot", T, || async {
        env.members[2]
            .sql("SELECT count(*)::text FROM pg_replication_slots WHERE slot_name = 'cdc'")
            .await
            .ok()
            == Some(vec!["1".to_owned()])
    })
    .await;
    wait_until("pg1 passes hot standby feedback on", T, || async {
        env.members[1].sql("SHOW hot_standby_feedback").await.ok() == Some(vec!["on".to_owned()])
    })
    .await;

    // pg1 gone: pg2 falls back to the leader, which now keeps its slot.
    env.member("pg1").kill9_with_postmaster();
    wait_until("pg2 streams from the leader", T, || async {
        stream_source(&env, "pg2").await == Some((pg0_port, "pg2".to_owned()))
    })
    .await;
    // pg1 back: pg2 cascades from it again.
    env.member("pg1").restart().expect("restart pg1");
    wait_until("pg2 streams from pg1 again", T, || async {
        stream_source(&env, "pg2").await == Some((pg1_port, "pg2".to_owned()))
    })
    .await;
    env.members[0]
        .sql("INSERT INTO c VALUES (2)")
        .await
        .expect("write on the leader");
    wait_until("the new row reaches pg2", T, || async {
        env.members[2].sql("SELECT count(*) FROM c").await.ok() == Some(vec!["2".to_owned()])
    })
    .await;
}

/// Patroni's `nostream` tag: the member replays from the archive only (`in archive recovery`
/// in its member key, no WAL receiver) and the leader keeps no slot for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nostream_member_replays_from_the_archive_only() {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    let archive = env.shared_dir("archive");
    for name in ["pg0", "pg1"] {
        let i = env.add_member(name);
        let m = &mut env.members[i];
        m.set("postgresql.parameters.archive_mode", "on".into());
        m.set(
            "postgresql.parameters.archive_command",
            format!("cp %p {}/%f", archive.display()).into(),
        );
        m.set(
            "postgresql.parameters.restore_command",
            format!("cp {}/%f %p", archive.display()).into(),
        );
    }
    env.members[1].set("tags.nostream", true.into());
    env.start_member(0).expect("start pg0");
    assert_eq!(env.wait_for_leader(T).await, "pg0");
    env.members[0]
        .sql("CREATE TABLE a (v int); INSERT INTO a VALUES (1)")
        .await
        .expect("write on the leader");
    env.start_member(1).expect("start pg1");
    let key = env.key("members/pg1");
    wait_until("pg1 publishes `in archive recovery`", T, || async {
        env.etcd
            .get(&key)
            .await
            .ok()
            .flatten()
            .and_then(|raw| serde_json::from_str::<serde_json::Value>(&raw).ok())
            .is_some_and(|j| {
                j["replication_state"] == "in archive recovery" && j["state"] == "running"
            })
    })
    .await;
    // Two statements: in one implicit transaction the commit would follow the switch.
    env.members[0]
        .sql("INSERT INTO a VALUES (2)")
        .await
        .expect("write on the leader");
    env.members[0]
        .sql("SELECT pg_switch_wal()")
        .await
        .expect("switch WAL on the leader");
    wait_until("the rows reach pg1 through the archive", T, || async {
        env.members[1].sql("SELECT count(*) FROM a").await.ok() == Some(vec!["2".to_owned()])
    })
    .await;
    assert_eq!(
        stream_source(&env, "pg1").await,
        None,
        "pg1 does not stream"
    );
    let slots = physical_slots(&env, "pg0").await;
    assert!(
        slots
            .as_ref()
            .is_some_and(|s| !s.iter().any(|x| x == "pg1")),
        "the leader keeps no slot for pg1: {slots:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_fenced_before_its_lease_expires() {
    let (mut env, _) = three_members(ClusterOptions::default(), false).await;
    let old = env.leader().await.expect("leader");
    let writer = start_writer(&env, &old).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let old_postmaster = env.member(&old).postmaster_pid().expect("postmaster");
    env.member(&old).agent().sigstop();
    let new = wait_for_new_leader(&env, &old).await;
    // The fence guard stopped the frozen leader's postgres before the lease ran out.
    assert!(
        !pgwarden_tests::harness::process::pid_alive(old_postmaster),
        "the frozen leader's postmaster must be stopped by the fence guard"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.member(&old).agent().sigcont();
    wait_for_replica(&env, &old).await;
    let acks = writer.stop().await;
    assert_no_split_brain(&acks);
    assert!(acks.iter().any(|a| a.member == new));
    let log = env.member(&old).log_text();
    assert!(
        log.contains("fence-guard"),
        "the guard logged why it acted:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_demotes_itself_and_rejoins_after_healing() {
    let (mut env, proxies) = three_members(ClusterOptions::default(), true).await;
    let old = env.leader().await.expect("leader");
    let index = env
        .members
        .iter()
        .position(|m| m.name == old)
        .expect("index");
    let writer = start_writer(&env, &old).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let old_postmaster = env.member(&old).postmaster_pid().expect("postmaster");
    proxies[index].cut();
    let new = wait_for_new_leader(&env, &old).await;
    assert!(
        !pgwarden_tests::harness::process::pid_alive(old_postmaster),
        "the isolated leader stopped postgres"
    );
    proxies[index].heal();
    wait_for_replica(&env, &old).await;
    let acks = writer.stop().await;
    assert_no_split_brain(&acks);
    assert!(acks.iter().any(|a| a.member == new));
    let log = env.member(&old).log_text();
    assert!(
        log.contains("fencing"),
        "the agent says it fenced postgres:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_switchover_a_killed_leader_still_rejoins() {
    let options = ClusterOptions {
        loop_wait: 2,
        ..Default::default()
    };
    let (mut env, _) = three_members(options, false).await;
    let first = env.leader().await.expect("leader");
    let candidate = env
        .members
        .iter()
        .map(|m| m.name.clone())
        .find(|n| *n != first)
        .expect("candidate");
    // The candidate must stream first: a clean-clone CI run asked while it was still being
    // cloned, and the leader rightly refused (503).
    env.wait_for_streaming(&first, 2, T).await;
    let body = format!(r#"{{"leader": "{first}", "candidate": "{candidate}"}}"#);
    let (code, text) = env
        .member(&first)
        .api_request("POST", "/switchover", Some(&body))
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");
    wait_for_replica(&env, &first).await;
    env.wait_for_streaming(&candidate, 2, T).await;

    let writer = start_writer(&env, &candidate).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.member(&candidate).kill9_with_postmaster();
    let new = wait_for_new_leader(&env, &candidate).await;
    env.member(&candidate).restart().expect("restart");
    wait_for_replica(&env, &candidate).await;
    let acks = writer.stop().await;
    assert_no_split_brain(&acks);
    assert_ne!(new, candidate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_after_a_failover_and_rejoin_leaves_a_healthy_cluster() {
    let options = ClusterOptions {
        loop_wait: 2,
        ..Default::default()
    };
    let (mut env, _) = three_members(options, false).await;
    let first = env.leader().await.expect("leader");
    env.member(&first).kill9_with_postmaster();
    let second = wait_for_new_leader(&env, &first).await;
    env.member(&first).restart().expect("restart");
    wait_for_replica(&env, &first).await;
    env.wait_for_streaming(&second, 2, T).await;

    let candidate = env
        .members
        .iter()
        .map(|m| m.name.clone())
        .find(|n| *n != second)
        .expect("candidate");
    let body = format!(r#"{{"leader": "{second}", "candidate": "{candidate}"}}"#);
    let (code, text) = env
        .member(&second)
        .api_request("POST", "/switchover", Some(&body))
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");
    env.wait_for_streaming(&candidate, 2, T).await;
}

/// Kill -9 of whoever leads, several times in a row: each time exactly one member takes over,
/// the killed one rejoins (rewound onto the new timeline), and the cluster is whole again before
/// the next kill. Catches state that survives one failover but not the next (timelines, slots,
/// restart backoff).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_kill9_failovers_each_leave_a_whole_cluster() {
    let options = ClusterOptions {
        loop_wait: 2,
        ..ClusterOptions::default()
    };
    let (mut env, _) = three_members(options, false).await;
    let first = env.leader().await.expect("leader");
    let writer = start_writer(&env, &first).await;
    for round in 0..4 {
        let old = env.leader().await.expect("leader");
        env.member(&old).kill9_with_postmaster();
        let new = wait_for_new_leader(&env, &old).await;
        env.member(&old).restart().expect("restart the old leader");
        wait_for_replica(&env, &old).await;
        env.wait_for_streaming(&new, 2, T).await;
        eprintln!("round {round}: {old} -> {new}, cluster whole again");
    }
    let acks = writer.stop().await;
    assert_no_split_brain(&acks);
}

/// Found by the fault campaign (seed 20261214): a former primary rewinds against a new leader
/// whose address accepts connections and closes them at once (a proxy there, or a postgres
/// shutting down). Once that heals, the former primary must rejoin: the check before pg_rewind
/// is a query, not a TCP connect, and a pg_rewind that could not connect is retried rather than
/// keeping the member down for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_primary_rewinds_once_the_new_leader_is_reachable_again() {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    let mut to_postgres = Vec::new();
    for name in ["pg0", "pg1", "pg2"] {
        let i = env.add_member(name);
        let proxy = TcpProxy::start(format!("127.0.0.1:{}", env.members[i].pg_port))
            .await
            .expect("proxy");
        env.members[i].set("postgresql.connect_address", proxy.endpoint().into());
        to_postgres.push(proxy);
    }
    for i in 0..3 {
        env.start_member(i).expect("start");
    }
    let old = env.wait_for_leader(T).await;
    env.wait_for_streaming(&old, 2, T).await;
    let writer = start_writer(&env, &old).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    env.member(&old).kill9_with_postmaster();
    let new = wait_for_new_leader(&env, &old).await;
    let new_index = env
        .members
        .iter()
        .position(|m| m.name == new)
        .expect("index");
    to_postgres[new_index].cut();
    env.member(&old).restart().expect("restart the old leader");
    wait_until(
        "the former primary tries to rewind against the unreachable new leader",
        T,
        || async {
            let log = log_of(&env, &old);
            log.contains("not ready for pg_rewind") || log.contains("the member stays down")
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    to_postgres[new_index].heal();
    wait_for_replica(&env, &old).await;
    wait_until(&format!("{old} streams from {new}"), T, || async {
        env.members
            .iter()
            .find(|m| m.name == old)
            .expect("member")
            .is_streaming_replica()
            .await
    })
    .await;
    let acks = writer.stop().await;
    assert_no_split_brain(&acks);
    let log = log_of(&env, &old);
    assert!(
        !log.contains("the member stays down"),
        "pg_rewind must not have failed for good:\n{log}"
    );
}

fn log_of(env: &TestEnv, name: &str) -> String {
    env.members
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.log_text())
        .unwrap_or_default()
}

/// `primary_start_timeout: 0`: a leader whose postgres crashes (the agent alive) hands the lock
/// to a healthy replica at once instead of restarting in place (Patroni §5.3), and rejoins as a
/// replica of the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_fails_over_at_once_with_primary_start_timeout_0() {
    let (mut env, _) = three_members(ClusterOptions::default(), false).await;
    let old = env.leader().await.expect("leader");
    let m = env.members.iter().find(|m| m.name == old).expect("leader");
    let (code, body) = m
        .api_request("PATCH", "/config", Some(r#"{"primary_start_timeout": 0}"#))
        .await
        .expect("PATCH /config answers");
    assert_eq!(code, 200, "{body}");
    // Every member applies the change from the `config` key within a cycle or two.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let postmaster = env.member(&old).postmaster_pid().expect("postmaster runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(postmaster),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the postmaster");
    let new = wait_for_new_leader(&env, &old).await;
    assert_ne!(new, old);
    wait_for_replica(&env, &old).await;
    let log = log_of(&env, &old);
    assert!(
        log.contains("primary_start_timeout"),
        "the former leader says why it released the lock"
    );
}

/// With the default `primary_start_timeout` the same crash is a restart in place: the lock
/// stays where it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_restarts_in_place_within_primary_start_timeout() {
    let (mut env, _) = three_members(ClusterOptions::default(), false).await;
    let old = env.leader().await.expect("leader");
    let postmaster = env.member(&old).postmaster_pid().expect("postmaster runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(postmaster),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the postmaster");
    let m = env.members.iter().find(|m| m.name == old).expect("leader");
    wait_until("the old leader runs postgres again", T, || async {
        m.postmaster_pid().is_some_and(|p| p != postmaster)
            && m.api_get("/primary").await.map(|(s, _)| s) == Some(200)
    })
    .await;
    assert_eq!(env.leader().await.as_deref(), Some(old.as_str()));
}

/// A standby whose WAL replay paused because the primary restarted with a higher
/// `max_connections` ("insufficient parameter settings") is reported unhealthy with its real
/// lag while paused, then restarted with the primary's value and replays again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_paused_by_the_primarys_higher_max_connections_replays_again() {
    let (env, _) = three_members(ClusterOptions::default(), false).await;
    let leader = env.leader().await.expect("leader");
    let l = env
        .members
        .iter()
        .find(|m| m.name == leader)
        .expect("leader");
    l.sql("CREATE TABLE paused_replay (id int)")
        .await
        .expect("create");
    let (code, body) = l
        .api_request(
            "PATCH",
            "/config",
            Some(r#"{"postgresql": {"parameters": {"max_connections": 150}}}"#),
        )
        .await
        .expect("PATCH /config answers");
    assert_eq!(code, 200, "{body}");
    wait_until("the leader reports a pending restart", T, || async {
        l.api_get("/patroni")
            .await
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
            .is_some_and(|j| j["pending_restart"] == true)
    })
    .await;
    // Only the primary restarts: its first WAL after the start records max_connections = 150,
    // which the standbys (still at 100) cannot replay.
    let (code, body) = l
        .api_request("POST", "/restart", Some("{}"))
        .await
        .expect("POST /restart answers");
    assert!(code == 200 || code == 202, "{code} {body}");
    wait_until("the leader runs with max_connections 150", T, || async {
        l.sql("SHOW max_connections").await.ok() == Some(vec!["150".into()])
    })
    .await;
    l.sql("INSERT INTO paused_replay VALUES (1)")
        .await
        .expect("insert after the restart");
    for m in env.members.iter().filter(|m| m.name != leader) {
        wait_until(
            &format!("{} replays the row written after the restart", m.name),
            T,
            || async {
                m.sql("SELECT count(*)::text FROM paused_replay").await.ok()
                    == Some(vec!["1".into()])
            },
        )
        .await;
        assert_eq!(
            m.sql("SHOW max_connections").await.expect("sql"),
            vec!["150"]
        );
        wait_for_replica(&env, &m.name).await;
    }
}

/// A `bin_dir` of links to the PostgreSQL binaries in which `pg_basebackup` and `pg_rewind` are
/// scripts that append their command line (and any `PGPASSWORD` they were given) to
/// `<dir>/argv.log` before running the real tool: what `ps` would show any local user.
fn recording_bin_dir(env: &TestEnv) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let real = std::path::PathBuf::from(
        std::env::var("PGWARDEN_PG_BIN_DIR")
            .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
    );
    let dir = env.shared_dir("bin");
    let log = dir.join("argv.log");
    std::fs::write(&log, "").expect("create the argv log");
    for entry in std::fs::read_dir(&real)
        .expect("the PostgreSQL bin dir")
        .flatten()
    {
        let name = entry.file_name();
        let target = dir.join(&name);
        if name == "pg_basebackup" || name == "pg_rewind" {
            let script = format!(
                "#!/bin/sh\nprintf '%s\\n' \"$0 $* PGPASSWORD=${{PGPASSWORD-}}\" >> {log}\nexec {real} \"$@\"\n",
                log = log.display(),
                real = entry.path().display(),
            );
            std::fs::write(&target, script).expect("write the wrapper");
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        } else {
            std::os::unix::fs::symlink(entry.path(), &target).expect("link");
        }
    }
    // Owned by the agents' user, so the wrappers may append to the log.
    env.shared_dir("bin");
    (dir, log)
}

/// Files under `dir` that users other than the owner may read and that contain `secret`.
fn readable_files_containing(dir: &std::path::Path, secret: &str, found: &mut Vec<String>) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            readable_files_containing(&path, secret, found);
        } else if meta.is_file() && meta.permissions().mode() & 0o044 != 0 {
            let bytes = std::fs::read(&path).unwrap_or_default();
            if String::from_utf8_lossy(&bytes).contains(secret) {
                found.push(format!(
                    "{} ({:o})",
                    path.display(),
                    meta.permissions().mode() & 0o777
                ));
            }
        }
    }
}

/// The replication and superuser passwords never appear on a command line (`ps`), in the
/// agent's log (postgres' own lines included: it echoes a changed `primary_conninfo`) or in a
/// file others may read, through a clone (pg_basebackup) and a rewind (pg_rewind): the agent
/// writes a 0600 password file and names it with `passfile`/`PGPASSFILE`, as Patroni does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_stay_out_of_command_lines_logs_and_readable_files() {
    const SECRETS: [&str; 2] = ["su-secret", "rep-secret"];
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    let (bin, argv_log) = recording_bin_dir(&env);
    for name in ["pg0", "pg1"] {
        let i = env.add_member(name);
        env.members[i].set("postgresql.bin_dir", bin.display().to_string().into());
    }
    env.start_member(0).expect("start");
    env.wait_for_leader(T).await;
    env.start_member(1).expect("start");
    wait_for_replica(&env, "pg1").await;

    env.member("pg0").kill9_with_postmaster();
    assert_eq!(wait_for_new_leader(&env, "pg0").await, "pg1");
    env.member("pg0").restart().expect("restart pg0");
    wait_for_replica(&env, "pg0").await;
    assert!(log_of(&env, "pg0").contains("running pg_rewind"));

    let argv = std::fs::read_to_string(&argv_log).expect("argv log");
    assert!(
        argv.contains("pg_basebackup") && argv.contains("pg_rewind"),
        "{argv}"
    );
    for secret in SECRETS {
        assert!(
            !argv.contains(secret),
            "a password on a command line:\n{argv}"
        );
        for m in &env.members {
            let log = m.log_text();
            if let Some(line) = log.lines().find(|l| l.contains(secret)) {
                panic!("a password in {}'s log: {line}", m.name);
            }
            // Except the agent's own configuration, the test's file.
            let mut found = Vec::new();
            readable_files_containing(&m.dir, secret, &mut found);
            found.retain(|f| !f.starts_with(&m.config_path().display().to_string()));
            assert!(
                found.is_empty(),
                "readable files with a password: {found:?}"
            );
        }
    }
    use std::os::unix::fs::PermissionsExt;
    for m in &env.members {
        for file in [m.dir.join("pgpass"), m.data_dir().join("postgresql.conf")] {
            let mode = std::fs::metadata(&file)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
                .permissions()
                .mode();
            assert_eq!(
                mode & 0o077,
                0,
                "{} is mode {:o}",
                file.display(),
                mode & 0o777
            );
        }
        let conf = std::fs::read_to_string(m.data_dir().join("postgresql.conf")).expect("conf");
        if m.name == "pg0" {
            assert!(conf.contains("passfile="), "{conf}");
        }
    }
}

/// Issue 20 item 5: the new leader's `GET /primary` and its member record follow the promotion
/// as soon as postgres leaves recovery, not on its next tick: with `loop_wait` 10 s both used
/// to lag the first successful write by up to 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_leader_publishes_its_promotion_before_the_next_loop_wait_tick() {
    let options = ClusterOptions {
        ttl: 30,
        loop_wait: 10,
        retry_timeout: 5,
        ..Default::default()
    };
    let mut env = TestEnv::start(options).await.expect("etcd");
    for name in ["pg0", "pg1"] {
        env.add_member(name);
    }
    for i in 0..2 {
        env.start_member(i).expect("start");
    }
    let old = env.wait_for_leader(T).await;
    env.wait_for_streaming(&old, 1, T).await;
    let candidate = env
        .members
        .iter()
        .map(|m| m.name.clone())
        .find(|n| *n != old)
        .expect("candidate");
    let writer = start_writer(&env, &old).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let body = format!(r#"{{"leader": "{old}", "candidate": "{candidate}"}}"#);
    let leader = env.members.iter().find(|m| m.name == old).expect("leader");
    let new = env
        .members
        .iter()
        .find(|m| m.name == candidate)
        .expect("candidate");
    let member_key = env.key(&format!("members/{candidate}"));
    let switchover = leader.api_request("POST", "/switchover", Some(&body));
    let published = async {
        let (mut primary_at, mut record_at) = (None, None);
        let deadline = std::time::Instant::now() + T;
        while std::time::Instant::now() < deadline && (primary_at.is_none() || record_at.is_none())
        {
            if primary_at.is_none() && new.api_get("/primary").await.map(|(s, _)| s) == Some(200) {
                primary_at = Some(std::time::Instant::now());
            }
            if record_at.is_none() {
                let record = env.etcd.get(&member_key).await.ok().flatten();
                let role = record
                    .and_then(|r| serde_json::from_str::<serde_json::Value>(&r).ok())
                    .and_then(|v| v["role"].as_str().map(str::to_owned));
                if role.as_deref() == Some("primary") {
                    record_at = Some(std::time::Instant::now());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (primary_at, record_at)
    };
    let (answer, (primary_at, record_at)) = tokio::join!(switchover, published);
    let (code, text) = answer.expect("answers");
    assert_eq!(code, 200, "{text}");
    let acks = writer.stop().await;
    assert_no_split_brain(&acks);
    let first_write = acks
        .iter()
        .filter(|a| a.member == candidate)
        .map(|a| a.at)
        .min()
        .unwrap_or_else(|| panic!("no write was acknowledged by {candidate}"));
    // Half of `loop_wait`: the tick after the promotion comes 10 s after it.
    let limit = Duration::from_secs(5);
    let primary_at = primary_at.expect("the new leader's /primary answers 200");
    let behind = primary_at.saturating_duration_since(first_write);
    assert!(
        behind < limit,
        "{candidate}'s /primary answered 200 {behind:?} after its first write (loop_wait 10 s)"
    );
    let record_at = record_at.expect("the new leader's member record says primary");
    let behind = record_at.saturating_duration_since(first_write);
    assert!(
        behind < limit,
        "{candidate}'s member record said primary {behind:?} after its first write (loop_wait 10 s)"
    );
}

/// Every write `from` acknowledged is on `on` (synchronous mode promises it across a failover).
async fn assert_acks_kept(
    env: &TestEnv,
    acks: &[pgwarden_tests::harness::writer::Ack],
    from: &str,
    on: &str,
) {
    let ids: Vec<String> = acks
        .iter()
        .filter(|a| a.member == from)
        .map(|a| a.id.to_string())
        .collect();
    assert!(
        !ids.is_empty(),
        "{from} acknowledged writes before the crash"
    );
    let m = env.members.iter().find(|m| m.name == on).expect("member");
    let found = m
        .sql(&format!(
            "SELECT count(*)::text FROM pgwarden_writer WHERE id IN ({})",
            ids.join(",")
        ))
        .await
        .expect("count");
    assert_eq!(
        found,
        vec![ids.len().to_string()],
        "every write {from} acknowledged is on {on}"
    );
}

/// Proof-of-death release (issue 20): kill -9 of the leader's agent alone. Its postgres dies
/// with it (parent-death signal); the fence guard, which outlives the agent, proves postgres
/// stopped and releases the leader key, so the others fail over without waiting for the lease.
/// The agent, restarted at once on the same data directory, waits for its guard and comes back
/// as a streaming replica, never as a second primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_guard_releases_the_leader_once_postgres_is_proven_stopped() {
    // A ttl far longer than the failover: the old leader's lease cannot be what ends it.
    let options = ClusterOptions {
        ttl: 60,
        synchronous_mode: true,
        ..ClusterOptions::default()
    };
    let (mut env, _) = three_members(options, false).await;
    let old = env.leader().await.expect("leader");
    // Until `sync` names a standby nobody may take over (and the guard keeps the record).
    wait_until("`sync` names a synchronous standby", T, || async {
        env.etcd
            .get(&env.key("sync"))
            .await
            .ok()
            .flatten()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .is_some_and(|j| j["sync_standby"].as_str().is_some_and(|s| !s.is_empty()))
    })
    .await;
    let writer = start_writer(&env, &old).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let old_postmaster = env.member(&old).postmaster_pid().expect("postmaster");

    env.member(&old).agent().kill9();
    // At once, as systemd's Restart= would: it must wait for the guard.
    env.member(&old).restart().expect("restart the agent");
    let new = wait_for_new_leader(&env, &old).await;
    assert!(
        !pgwarden_tests::harness::process::pid_alive(old_postmaster),
        "the killed agent's postmaster is gone"
    );
    wait_for_replica(&env, &old).await;
    let acks = writer.stop().await;
    assert_no_split_brain(&acks);
    assert!(
        acks.iter().any(|a| a.member == new),
        "writes resumed on {new}"
    );
    assert_acks_kept(&env, &acks, &old, &new).await;
    let log = env.member(&old).log_text();
    assert!(
        log.contains("released the leader"),
        "the guard released the leader after proving postgres stopped:\n{log}"
    );
}

/// Never on silence alone: when the guard cannot reach etcd, it releases nothing and the lease
/// runs out as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_guard_that_cannot_reach_etcd_releases_nothing() {
    let (mut env, proxies) = three_members(ClusterOptions::default(), true).await;
    let old = env.leader().await.expect("leader");
    let i = env
        .members
        .iter()
        .position(|m| m.name == old)
        .expect("leader");
    proxies[i].black_hole();
    env.member(&old).agent().kill9();
    let new = wait_for_new_leader(&env, &old).await;
    wait_until("the guard gave up on the release", T, || async {
        env.members[i].log_text().contains("runs out instead")
    })
    .await;
    let log = env.member(&old).log_text();
    assert!(
        !log.contains("released the leader"),
        "nothing was released without etcd:\n{log}"
    );
    proxies[i].heal();
    env.member(&old).restart().expect("restart the agent");
    wait_for_replica(&env, &old).await;
    assert_ne!(new, old);
}

/// Item 3 of the proof-of-death release: when no other member could take over (here the only
/// replica is tagged `nofailover`), the guard keeps the leader record, and the agent restarted
/// on the same data directory within the ttl resumes as leader after crash recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_nobody_can_replace_resumes_as_leader_after_its_restart() {
    let options = ClusterOptions {
        ttl: 60,
        ..ClusterOptions::default()
    };
    let mut env = TestEnv::start(options).await.expect("etcd");
    env.add_member("pg0");
    let i = env.add_member("pg1");
    env.members[i].set("tags.nofailover", serde_yaml::Value::Bool(true));
    env.start_member(0).expect("start pg0");
    let old = env.wait_for_leader(T).await;
    assert_eq!(old, "pg0");
    env.start_member(i).expect("start pg1");
    env.wait_for_streaming(&old, 1, T).await;

    env.member(&old).agent().kill9();
    env.member(&old).restart().expect("restart the agent");
    wait_until("pg0 leads again and accepts writes", T, || async {
        env.leader().await.as_deref() == Some("pg0")
            && env.members[0]
                .sql("SELECT pg_is_in_recovery()::text")
                .await
                .ok()
                == Some(vec!["false".into()])
    })
    .await;
    wait_for_replica(&env, "pg1").await;
    let log = env.members[0].log_text();
    assert!(
        log.contains("no other member can take over") && !log.contains("released the leader"),
        "the guard kept the record:\n{log}"
    );
}

/// Failsafe mode (Patroni §5.8 and its `dcs_failsafe_mode.feature`): the leader publishes the
/// topology in `failsafe`; cut off from etcd, it stays primary while every member accepts its
/// `POST /failsafe`, and the replicas, which still reach etcd and see the leader key expire, do
/// not race for it. Once the DCS is gone for everyone and one member stops answering, the
/// leader is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_failsafe_mode_a_leader_cut_off_from_etcd_stays_primary_while_every_member_answers() {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    let mut proxies = Vec::new();
    for name in ["pg0", "pg1", "pg2"] {
        let i = env.add_member(name);
        let proxy = TcpProxy::start(env.etcd.endpoint()).await.expect("proxy");
        env.members[i].set(
            "etcd3.hosts",
            serde_yaml::Value::Sequence(vec![proxy.endpoint().into()]),
        );
        env.members[i].set("bootstrap.dcs.failsafe_mode", true.into());
        proxies.push(proxy);
    }
    for i in 0..3 {
        env.start_member(i).expect("start");
    }
    let old = env.wait_for_leader(T).await;
    env.wait_for_streaming(&old, 2, T).await;
    let index = env
        .members
        .iter()
        .position(|m| m.name == old)
        .expect("index");
    let leader = &env.members[index];
    wait_until("GET /failsafe lists the three members", T, || async {
        leader
            .api_get("/failsafe")
            .await
            .is_some_and(|(code, body)| {
                code == 200 && ["pg0", "pg1", "pg2"].iter().all(|n| body.contains(n))
            })
    })
    .await;
    let (_, metrics) = leader.api_get("/metrics").await.expect("metrics");
    for line in ["patroni_failsafe_mode_enabled{", "patroni_failsafe_member{"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(line) && l.ends_with(" 1")),
            "{line}:\n{metrics}"
        );
    }
    env.create_writer_table(&old).await;
    let writer = Writer::start(env.writer_targets());
    let postmaster = env.member(&old).postmaster_pid().expect("postmaster");

    proxies[index].cut();
    let cut_at = std::time::Instant::now();
    let leader = &env.members[index];
    wait_until("the leader says failsafe mode is active", T, || async {
        leader
            .api_get("/patroni")
            .await
            .is_some_and(|(_, body)| body.contains("\"failsafe_mode_is_active\":true"))
    })
    .await;
    wait_until("the leader key expired in etcd", T, || async {
        env.leader().await.is_none()
    })
    .await;
    // Two more ttls without the key: nobody races, the leader keeps its postgres.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(env.leader().await, None, "a replica took the expired key");
    assert!(
        pgwarden_tests::harness::process::pid_alive(postmaster),
        "the leader's postgres was stopped although every member answered"
    );
    for m in env.members.iter().filter(|m| m.name != old) {
        assert_eq!(
            m.sql("SELECT pg_is_in_recovery()::text").await.ok(),
            Some(vec!["true".to_owned()]),
            "{} is still a replica",
            m.name
        );
    }
    proxies[index].heal();
    wait_until("the leader holds the key again", T, || async {
        env.leader().await.as_deref() == Some(old.as_str())
    })
    .await;
    let acks = writer.stop().await;
    assert_no_split_brain(&acks);
    assert!(
        acks.iter()
            .any(|a| a.member == old && a.at > cut_at + Duration::from_secs(20)),
        "the leader acknowledged writes through the outage"
    );
    let log = env.member(&old).log_text();
    assert!(
        log.contains("failsafe mode is enabled and all members are accessible"),
        "{log}"
    );

    // Now etcd is gone for everyone and one replica does not answer: the leader is fenced.
    let silent = env
        .members
        .iter()
        .map(|m| m.name.clone())
        .find(|n| *n != old)
        .expect("a replica");
    for p in &proxies {
        p.cut();
    }
    env.member(&silent).agent().sigstop();
    let leader = &env.members[index];
    wait_until("the leader stops accepting writes", T, || async {
        leader.sql("SELECT pg_is_in_recovery()::text").await.ok() != Some(vec!["false".to_owned()])
    })
    .await;
    env.member(&silent).agent().sigcont();
    for p in &proxies {
        p.heal();
    }
    env.wait_for_leader(T).await;
}
