//! Permanent logical slots on a real 3-member cluster, as Patroni 4 keeps them
//! (`patroni/postgresql/slots.py`, docs "dynamic configuration: slots"): the primary creates the
//! slot, the replicas copy it and keep it advanced to the position the primary publishes, and
//! after a failover a logical consumer continues on the new primary with exactly the changes
//! it had not consumed. Logical slots that are not configured are dropped unless ignored, and a
//! slot whose plugin changes in the configuration is made again, on the primary and the
//! replicas. Across switchovers the demoted primary keeps its slot and has it advanced.

use std::time::Duration;

use pgwarden_tests::harness::{wait_until, ClusterOptions, TestEnv};

const T: Duration = Duration::from_secs(90);

/// test_decoding's output of the changes not consumed yet, without transaction ids; peeking
/// leaves the slot where it is.
const PEEK: &str = "SELECT data FROM pg_logical_slot_peek_changes('cdc', NULL, NULL, \
                    'include-xids', '0', 'skip-empty-xacts', '1')";

fn inserted(ids: std::ops::RangeInclusive<i32>) -> Vec<String> {
    ids.flat_map(|id| {
        [
            "BEGIN".to_owned(),
            format!("table public.events: INSERT: id[integer]:{id}"),
            "COMMIT".to_owned(),
        ]
    })
    .collect()
}

/// The plugin of the slot `name` on `member`, if it has the slot.
async fn plugin(member: &pgwarden_tests::harness::Member, name: &str) -> Option<String> {
    member
        .sql(&format!(
            "SELECT plugin::text FROM pg_replication_slots WHERE slot_name = '{name}'"
        ))
        .await
        .ok()?
        .into_iter()
        .next()
}

/// The slot's `confirmed_flush_lsn` on `member`, if it has the slot.
async fn confirmed_flush(member: &pgwarden_tests::harness::Member) -> Option<String> {
    member
        .sql("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'cdc'")
        .await
        .ok()?
        .into_iter()
        .next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_logical_slot_survives_a_failover_without_losing_or_repeating_changes() {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    for name in ["pg0", "pg1", "pg2"] {
        let i = env.add_member(name);
        let m = &mut env.members[i];
        m.set_permanent_slots("cdc: {type: logical, database: postgres, plugin: test_decoding}");
        m.set(
            "bootstrap.dcs.ignore_slots",
            serde_yaml::from_str("[{name: external, type: logical}]").expect("yaml"),
        );
    }
    for i in 0..3 {
        env.start_member(i).expect("start");
    }
    let old = env.wait_for_leader(T).await;
    let leader = env.members.iter().find(|m| m.name == old).expect("leader");
    wait_until("the leader has the logical slot", T, || async {
        confirmed_flush(leader).await.is_some()
    })
    .await;
    // Logical slots made by hand: the unknown one goes, the ignored one stays.
    for slot in ["stray", "external"] {
        leader
            .sql(&format!(
                "SELECT pg_create_logical_replication_slot('{slot}', 'test_decoding')"
            ))
            .await
            .expect("slot made by hand");
    }
    wait_until("the unknown logical slot is dropped", T, || async {
        plugin(leader, "stray").await.is_none()
    })
    .await;
    assert!(plugin(leader, "external").await.is_some(), "ignored: kept");
    leader
        .sql("SELECT pg_drop_replication_slot('external')")
        .await
        .expect("drop");
    leader
        .sql("CREATE TABLE events (id int PRIMARY KEY)")
        .await
        .expect("table");
    // One transaction each: the consumer below stops at a transaction boundary.
    for id in 1..=6 {
        leader
            .sql(&format!("INSERT INTO events VALUES ({id})"))
            .await
            .expect("insert");
    }
    // The consumer takes the first three transactions (3 rows each) and confirms them.
    let consumed = leader
        .sql(
            "SELECT data FROM pg_logical_slot_get_changes('cdc', NULL, 9, \
             'include-xids', '0', 'skip-empty-xacts', '1')",
        )
        .await
        .expect("consume");
    assert_eq!(consumed, inserted(1..=3));
    assert_eq!(leader.sql(PEEK).await.expect("peek"), inserted(4..=6));

    // Each replica copies the slot, replays everything and advances its copy to where the
    // consumer confirmed (the primary publishes it in `status`).
    for replica in env.members.iter().filter(|m| m.name != old) {
        copy_caught_up(leader, replica).await;
        wait_until(
            &format!("{} finds its copy safe after a failover", replica.name),
            T,
            || async {
                replica
                    .log_text()
                    .contains("logical slot is safe to be used after a failover")
            },
        )
        .await;
        assert_eq!(
            replica
                .sql("SHOW hot_standby_feedback")
                .await
                .expect("show"),
            ["on"],
            "a replica holding logical slots sends feedback"
        );
    }
    let status = env
        .etcd
        .get(&env.key("status"))
        .await
        .expect("etcd")
        .expect("status");
    assert!(
        status.contains("\"cdc\""),
        "the slot is published: {status}"
    );

    env.member(&old).agent().kill9();
    let deadline = std::time::Instant::now() + T;
    let new = loop {
        if let Some(l) = env.leader().await.filter(|l| *l != old) {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let promoted = env.members.iter().find(|m| m.name == new).expect("new");
    wait_until("the new leader runs as a primary", T, || async {
        promoted
            .sql("SELECT pg_is_in_recovery()::text")
            .await
            .is_ok_and(|r| r == ["false"])
    })
    .await;
    assert!(
        !promoted
            .log_text()
            .contains("might be unsafe to use after promote"),
        "the copy was known safe before the promotion"
    );
    // Exactly the changes the consumer had not confirmed: none lost, none repeated.
    assert_eq!(promoted.sql(PEEK).await.expect("peek"), inserted(4..=6));
    // The consumer goes on on the new primary, with its new changes too.
    promoted
        .sql("INSERT INTO events VALUES (7)")
        .await
        .expect("insert on the new primary");
    let rest = promoted
        .sql(
            "SELECT data FROM pg_logical_slot_get_changes('cdc', NULL, NULL, \
             'include-xids', '0', 'skip-empty-xacts', '1')",
        )
        .await
        .expect("consume");
    assert_eq!(rest, inserted(4..=7));

    // Another plugin in the configuration: the slot is dropped and made again on the primary,
    // and the remaining replica replaces its copy. A transaction left open on the primary holds
    // the new slot's creation back, as postgres makes it wait for every transaction running
    // when it starts: it keeps waiting past the 5 s local query timeout (not cancelled and
    // started again, which under a workload that always has one never ends) and the slot
    // appears once that transaction ends.
    let holder = promoted.connect().await.expect("connect");
    holder
        .batch_execute("BEGIN; INSERT INTO events VALUES (100)")
        .await
        .expect("open transaction");
    let (code, text) = promoted
        .api_request(
            "PATCH",
            "/config",
            Some(r#"{"slots": {"cdc": {"type": "logical", "database": "postgres", "plugin": "pgoutput"}}}"#),
        )
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");
    wait_until(
        "the creation waits longer than the 5 s query timeout",
        T,
        || async {
            promoted
                .sql(
                    "SELECT count(*)::text FROM pg_stat_activity \
                 WHERE query LIKE '%pg_create_logical_replication_slot%' \
                 AND query NOT LIKE '%pg_stat_activity%' \
                 AND now() - query_start > interval '7 seconds'",
                )
                .await
                .ok()
                == Some(vec!["1".to_owned()])
        },
    )
    .await;
    holder.batch_execute("ROLLBACK").await.expect("rollback");
    for member in env.members.iter().filter(|m| m.name != old) {
        wait_until(
            &format!("{} has the slot with the new plugin", member.name),
            T,
            || async { plugin(member, "cdc").await.as_deref() == Some("pgoutput") },
        )
        .await;
    }
}

/// Waits until `replica` has replayed all `primary` wrote and its copy of the slot stands where
/// the consumer confirmed on `primary`.
async fn copy_caught_up(
    primary: &pgwarden_tests::harness::Member,
    replica: &pgwarden_tests::harness::Member,
) {
    let confirmed = confirmed_flush(primary).await.expect("the slot");
    let written = primary
        .sql("SELECT pg_current_wal_lsn()::text")
        .await
        .expect("lsn")[0]
        .clone();
    wait_until(
        &format!("{} has the slot at {confirmed}", replica.name),
        T,
        || async {
            replica
                .sql(&format!(
                    "SELECT (confirmed_flush_lsn >= '{confirmed}' \
                             AND pg_last_wal_replay_lsn() >= '{written}')::text \
                     FROM pg_replication_slots WHERE slot_name = 'cdc'"
                ))
                .await
                .is_ok_and(|r| r == ["true"])
        },
    )
    .await;
}

/// Consumes the changes of `transactions` transactions (3 rows each) on `member`.
async fn consume(member: &pgwarden_tests::harness::Member, transactions: usize) -> Vec<String> {
    member
        .sql(&format!(
            "SELECT data FROM pg_logical_slot_get_changes('cdc', NULL, {}, \
             'include-xids', '0', 'skip-empty-xacts', '1')",
            transactions * 3
        ))
        .await
        .expect("consume")
}

async fn switchover(env: &TestEnv, leader: &str, candidate: &str) {
    let member = env
        .members
        .iter()
        .find(|m| m.name == leader)
        .expect("leader");
    let body = format!(r#"{{"leader": "{leader}", "candidate": "{candidate}"}}"#);
    let (code, text) = member
        .api_request("POST", "/switchover", Some(&body))
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");
    let new = env
        .members
        .iter()
        .find(|m| m.name == candidate)
        .expect("candidate");
    wait_until(&format!("{candidate} runs as the primary"), T, || async {
        new.sql("SELECT pg_is_in_recovery()::text")
            .await
            .is_ok_and(|r| r == ["false"])
    })
    .await;
}

/// Switchovers back and forth: the demoted primary keeps its own slot as a replica, which is
/// advanced to where the consumer confirms on the new primary, so the consumer continues
/// across both switchovers with exactly the changes it had not confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logical_consumer_continues_across_switchovers_both_ways() {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    for name in ["pg0", "pg1"] {
        let i = env.add_member(name);
        let m = &mut env.members[i];
        m.set_permanent_slots("cdc: {database: postgres, plugin: test_decoding}");
    }
    for i in 0..2 {
        env.start_member(i).expect("start");
    }
    let first = env.wait_for_leader(T).await;
    let second = if first == "pg0" { "pg1" } else { "pg0" }.to_owned();
    let member = |name: &str| env.members.iter().find(|m| m.name == name).expect("member");
    wait_until("the leader has the logical slot", T, || async {
        confirmed_flush(member(&first)).await.is_some()
    })
    .await;
    member(&first)
        .sql("CREATE TABLE events (id int PRIMARY KEY)")
        .await
        .expect("table");
    for id in 1..=4 {
        member(&first)
            .sql(&format!("INSERT INTO events VALUES ({id})"))
            .await
            .expect("insert");
    }
    assert_eq!(consume(member(&first), 2).await, inserted(1..=2));
    copy_caught_up(member(&first), member(&second)).await;

    switchover(&env, &first, &second).await;
    assert_eq!(
        member(&second).sql(PEEK).await.expect("peek"),
        inserted(3..=4)
    );
    assert_eq!(consume(member(&second), 2).await, inserted(3..=4));
    member(&second)
        .sql("INSERT INTO events VALUES (5)")
        .await
        .expect("insert");
    // The former primary, now a replica, keeps its slot and has it advanced.
    copy_caught_up(member(&second), member(&first)).await;

    switchover(&env, &second, &first).await;
    assert_eq!(
        member(&first).sql(PEEK).await.expect("peek"),
        inserted(5..=5)
    );
}
