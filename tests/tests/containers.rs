//! The container images end to end: etcd and three `pgwarden/instance` containers on private
//! Docker networks, each container at its own address, faults injected with Docker itself
//! (`docker kill`, `docker network disconnect`, `docker stop`, and `kill -9` of the agent inside
//! its container). A writer on the host records every
//! acknowledged write through each scenario and the split-brain checker runs on its record.
//!
//! The scenarios run in sequence on one cluster: bootstrapping three containers is the slow part,
//! and four clusters at once would not fit a small machine. Without a Docker engine the test says
//! so and returns.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pgwarden_tests::harness::docker::{self, DockerCluster, Timing};
use pgwarden_tests::harness::writer::{assert_no_split_brain, Ack, Writer, CREATE_TABLE};
use pgwarden_tests::harness::{timeout_mult, wait_until};

const T: Duration = Duration::from_secs(120);

/// The member holding the leader key that also answers `/primary` and accepts writes; not `old`.
async fn wait_for_leader(c: &DockerCluster, old: Option<&str>) -> String {
    let started = Instant::now();
    let deadline = started + T.mul_f64(timeout_mult());
    let mut key_left_old = old.is_none();
    loop {
        let key = c.leader().await;
        if let (false, Ok(holder)) = (key_left_old, &key) {
            if holder.as_deref() != old {
                key_left_old = true;
                eprintln!(
                    "the leader key left {old:?} {:.1?} after the wait began (now {holder:?})",
                    started.elapsed()
                );
            }
        }
        if let Ok(Some(l)) = key {
            if Some(l.as_str()) != old
                && c.api_get(&l, "/primary").await.map(|(s, _)| s) == Some(200)
                && c.sql(&l, "SELECT pg_is_in_recovery()::text").await.ok()
                    == Some(vec!["false".into()])
            {
                return l;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no leader (other than {old:?}) within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_replica(c: &DockerCluster, name: &str) {
    wait_until(
        &format!("{name} runs as a streaming replica"),
        T,
        || async {
            c.api_get(name, "/replica").await.map(|(s, _)| s) == Some(200)
                && c.is_streaming_replica(name).await
        },
    )
    .await;
}

fn others<'a>(c: &'a DockerCluster, leader: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    c.nodes
        .iter()
        .map(|n| n.name.as_str())
        .filter(move |n| *n != leader)
}

/// Runs the split-brain check on a scenario's record, and checks that every write the final
/// leader acknowledged is on every member once they catch up (the rejoined one streams from it).
async fn check_writes(c: &DockerCluster, scenario: &str, acks: &[Ack], leader: &str) {
    assert_no_split_brain(acks);
    let mine: BTreeSet<i64> = acks
        .iter()
        .filter(|a| a.member == leader)
        .map(|a| a.id)
        .collect();
    assert!(
        !mine.is_empty(),
        "{scenario}: writes resumed on the new leader {leader}"
    );
    let ids = mine
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let query = format!("SELECT count(*)::text FROM pgwarden_writer WHERE id IN ({ids})");
    for n in &c.nodes {
        wait_until(
            &format!(
                "{scenario}: {} has the {} writes {leader} acknowledged",
                n.name,
                mine.len()
            ),
            T,
            || async { c.sql(&n.name, &query).await.ok() == Some(vec![mine.len().to_string()]) },
        )
        .await;
    }
    eprintln!(
        "{scenario}: {} acknowledged writes, {} by the leader {leader}, no split brain",
        acks.len(),
        mine.len()
    );
}

/// The agent's PID inside `container`: the child of PID 1 (`pgwarden-init`) named `pgwarden`.
async fn agent_pid(container: &str) -> String {
    let script = "for p in $(cat /proc/1/task/1/children); do \
                  [ \"$(cat /proc/$p/comm 2>/dev/null)\" = pgwarden ] && echo $p; done; true";
    let pids = docker::docker(&["exec", container, "sh", "-c", script])
        .await
        .expect("docker exec");
    let pids: Vec<&str> = pids.split_whitespace().collect();
    assert_eq!(pids.len(), 1, "one agent under PID 1: {pids:?}");
    pids[0].to_owned()
}

/// The image's entrypoint, PID 1, is `pgwarden-init` with the agent as its child, and it reaps
/// orphans re-parented to it.
async fn pid1_reaps_orphans(c: &DockerCluster, name: &str) {
    let container = &c.node(name).container;
    let comm = docker::docker(&["exec", container, "cat", "/proc/1/comm"])
        .await
        .expect("docker exec");
    assert_eq!(comm, "pgwarden-init", "the image's init is PID 1");
    agent_pid(container).await;
    // The shell exits at once, orphaning its `sleep`, which the kernel hands to PID 1.
    let pid = docker::docker(&["exec", container, "sh", "-c", "sleep 3 & echo $!"])
        .await
        .expect("docker exec");
    let stat = docker::docker(&["exec", container, "cat", &format!("/proc/{pid}/stat")])
        .await
        .expect("the orphan is still running");
    let ppid = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .map(str::to_owned);
    assert_eq!(ppid.as_deref(), Some("1"), "the orphan belongs to PID 1");
    // Once it exits it is a zombie until PID 1 collects it.
    wait_until(
        "PID 1 reaps the orphan after it exits",
        Duration::from_secs(20),
        || async {
            docker::docker(&["exec", container, "test", "-e", &format!("/proc/{pid}")])
                .await
                .is_err()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerised_cluster_survives_kill_partition_stop_and_agent_crash() {
    if let Some(why) = docker::unavailable().await {
        pgwarden_tests::harness::missing_tool(&format!("the container tests cannot run: {why}"));
        return;
    }
    let started = Instant::now();
    docker::build_images().await.expect("build the images");
    let timing = Timing::default();
    let ttl = Duration::from_secs(timing.ttl.into());
    let c = DockerCluster::start(3, timing)
        .await
        .expect("start etcd and three instance containers");

    // 1. Bootstrap: one leader, two streaming replicas, healthy by the image's HEALTHCHECK.
    let leader = wait_for_leader(&c, None).await;
    for r in others(&c, &leader) {
        wait_for_replica(&c, r).await;
        let (_, body) = c.api_get(r, "/patroni").await.expect("answers");
        let j: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(j["role"], "replica");
        assert_eq!(j["replication_state"], "streaming");
    }
    let slots = c
        .sql(
            &leader,
            "SELECT slot_name FROM pg_replication_slots WHERE active ORDER BY 1",
        )
        .await
        .expect("sql");
    assert_eq!(slots.len(), 2, "one active slot per replica: {slots:?}");
    for n in &c.nodes {
        wait_until(
            &format!("{} is healthy by its HEALTHCHECK", n.name),
            Duration::from_secs(90),
            || async {
                c.inspect(&n.name, "{{.State.Health.Status}}").await.ok() == Some("healthy".into())
            },
        )
        .await;
    }
    pid1_reaps_orphans(&c, &leader).await;
    c.sql(&leader, CREATE_TABLE)
        .await
        .expect("create the writer table");
    eprintln!("bootstrap: {leader} leads after {:.0?}", started.elapsed());

    // 2. docker kill of the primary: failover; the killed one, started again, rejoins.
    let old = leader;
    let writer = Writer::start_at(c.writer_targets());
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Lease-bound: what the lease had left at the kill (whole seconds, rounded up) is most of it.
    let lease_left = c.leader_lease_remaining().await.ok();
    let killed = Instant::now();
    docker::docker(&["kill", &c.node(&old).container])
        .await
        .expect("docker kill");
    let kill_returned = killed.elapsed();
    let leader = wait_for_leader(&c, Some(&old)).await;
    eprintln!(
        "kill: {leader} leads {:.1?} after the kill (lease left ≤ {lease_left:?}, `docker kill` took {kill_returned:.1?})",
        killed.elapsed()
    );
    docker::docker(&["start", &c.node(&old).container])
        .await
        .expect("docker start");
    wait_for_replica(&c, &old).await;
    // Rewound as the image's separate `rewinder` role, which needs its function grants.
    let log = c.log_text(&old).await;
    assert!(
        log.contains("running pg_rewind") && !log.contains("rewind failed"),
        "the killed primary was rewound"
    );
    let acks = writer.stop().await;
    check_writes(&c, "kill", &acks, &leader).await;

    // 3. docker network disconnect of the primary: it demotes itself before its lease can
    // expire, another leads; reconnected, it rejoins as a replica.
    let old = leader;
    let writer = Writer::start_at(c.writer_targets());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let remaining = c
        .leader_lease_remaining()
        .await
        .expect("the leader's lease");
    let cut = Instant::now();
    c.disconnect(&old).await.expect("disconnect the primary");
    // No renewal reaches etcd after the cut, so the lease ends by `expiry` (etcd rounds the
    // remaining time up, so this errs late by under a second).
    let expiry = cut + remaining;
    // Its REST API stays reachable over the client network: it stops claiming to be primary.
    wait_until(
        &format!("the isolated {old} stops answering /primary with 200"),
        ttl * 2,
        || async { c.api_get(&old, "/primary").await.map(|(s, _)| s) != Some(200) },
    )
    .await;
    let demoted_after = cut.elapsed();
    let leader = wait_for_leader(&c, Some(&old)).await;
    let new_leader_after = cut.elapsed();
    c.reconnect(&old).await.expect("reconnect");
    wait_for_replica(&c, &old).await;
    let acks = writer.stop().await;
    let last_old_ack = acks
        .iter()
        .filter(|a| a.member == old)
        .map(|a| a.at)
        .max()
        .expect("the old primary acknowledged writes before the cut");
    let first_new_ack = acks
        .iter()
        .filter(|a| a.member == leader)
        .map(|a| a.at)
        .min()
        .expect("the new leader acknowledged writes");
    assert!(
        last_old_ack < expiry,
        "the isolated primary accepted a write {:?} after the cut, its lease ended {remaining:?} \
         after the cut",
        last_old_ack.saturating_duration_since(cut)
    );
    assert!(
        last_old_ack < first_new_ack,
        "the isolated primary acknowledged a write after the new leader's first"
    );
    eprintln!(
        "partition: {old}'s last write {:.1?} after the cut, its lease ended by {remaining:?}; \
         /primary off after {demoted_after:.1?}; {leader} leads after {new_leader_after:.1?} \
         (ttl {ttl:?})",
        last_old_ack.saturating_duration_since(cut)
    );
    check_writes(&c, "partition", &acks, &leader).await;

    // 4. docker stop of the primary: a clean handover well before the ttl, the leader key
    // released rather than left to expire.
    let old = leader;
    let writer = Writer::start_at(c.writer_targets());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stop_started = Instant::now();
    let container = c.node(&old).container.clone();
    let stop = tokio::spawn(async move { docker::docker(&["stop", &container]).await });
    let mut released_after = None;
    while stop_started.elapsed() < ttl * 2 {
        match c.leader().await {
            Ok(Some(l)) if l == old => {}
            Ok(_) => {
                released_after = Some(stop_started.elapsed());
                break;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let released_after = released_after.expect("the leader key changed hands");
    assert!(
        released_after < ttl / 2,
        "the leader key of the stopped primary moved after {released_after:?}; a clean stop \
         must not wait for the ttl ({ttl:?})"
    );
    stop.await
        .expect("the stop task")
        .expect("docker stop returns");
    assert_eq!(
        c.inspect(&old, "{{.State.ExitCode}}")
            .await
            .expect("inspect"),
        "0",
        "the agent stopped cleanly on SIGTERM"
    );
    let leader = wait_for_leader(&c, Some(&old)).await;
    eprintln!(
        "stop: the leader key left {old} after {released_after:.1?}, {leader} leads (ttl {ttl:?})"
    );
    docker::docker(&["start", &c.node(&old).container])
        .await
        .expect("docker start");
    wait_for_replica(&c, &old).await;
    let acks = writer.stop().await;
    check_writes(&c, "stop", &acks, &leader).await;

    // 5. The agent of the primary crashes (SIGKILL inside the container): PID 1 is not the
    // agent, so the container lives on while postgres stops (its parent-death signal) and the
    // orphaned fence guard releases the leader key; then pgwarden-init exits with the agent's
    // status. Started again, the member rejoins as a replica.
    let old = leader;
    let writer = Writer::start_at(c.writer_targets());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let container = c.node(&old).container.clone();
    let agent = agent_pid(&container).await;
    let crashed = Instant::now();
    docker::docker(&["exec", &container, "sh", "-c", &format!("kill -9 {agent}")])
        .await
        .expect("kill the agent");
    let failover = async {
        let leader = wait_for_leader(&c, Some(&old)).await;
        (leader, crashed.elapsed())
    };
    // The guard's work is bounded by pgwarden-init's grace period (30 s).
    let exit = async {
        wait_until(
            &format!("the container of {old} exits after its agent crashed"),
            Duration::from_secs(90),
            || async { c.inspect(&old, "{{.State.Running}}").await.ok() == Some("false".into()) },
        )
        .await;
        crashed.elapsed()
    };
    let ((leader, new_leader_after), exited_after) = tokio::join!(failover, exit);
    assert_eq!(
        c.inspect(&old, "{{.State.ExitCode}}")
            .await
            .expect("inspect"),
        "137",
        "pgwarden-init exits with the agent's status: killed by SIGKILL"
    );
    let log = c.log_text(&old).await;
    let init_said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("pgwarden-init:"))
        .collect();
    eprintln!(
        "crash: {leader} leads {new_leader_after:.1?} after the agent of {old} was killed \
         (ttl {ttl:?}); its container exited after {exited_after:.1?}; pgwarden-init: \
         {init_said:?}"
    );
    docker::docker(&["start", &container])
        .await
        .expect("docker start");
    wait_for_replica(&c, &old).await;
    let acks = writer.stop().await;
    check_writes(&c, "crash", &acks, &leader).await;
    // The guard outlived the agent and released the key (its stderr is the container's log).
    assert!(
        log.contains("released the leader"),
        "the fence guard of {old} released the leader key after its agent crashed"
    );
    eprintln!("all scenarios passed in {:.0?}", started.elapsed());
}
