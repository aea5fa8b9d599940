//! Major-version upgrade of a member's data directory, 15 → 17, with the real binaries
//! (`pgwarden upgrade-data-dir`, docs/upgrade.md): the data survives (row count and a checksum
//! of every row), the agent runs the upgraded directory on the new binaries as leader again,
//! and the upgrade is refused, with nothing changed, where it is not safe.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use pgwarden_tests::harness::{
    agent_binary, pg17_bin_dir, run_as, wait_until, ClusterOptions, TestEnv,
};

const T: Duration = Duration::from_secs(60);
const CHECKSUM: &str =
    "SELECT count(*)::text || ' ' || md5(string_agg(t::text, ',' ORDER BY id)) FROM t";

/// `pgwarden upgrade-data-dir CONFIG [--new-bin-dir NEW] [--old-bin-dir OLD]`, as the agents'
/// user.
fn upgrade_data_dir(config: &Path, new_bin: Option<&Path>, old_bin: Option<&Path>) -> Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(agent_binary());
    cmd.arg("upgrade-data-dir").arg(config);
    if let Some(new) = new_bin {
        cmd.arg("--new-bin-dir").arg(new);
    }
    if let Some(old) = old_bin {
        cmd.arg("--old-bin-dir").arg(old);
    }
    if let Some(who) = run_as() {
        cmd.uid(who.uid).gid(who.gid).env("HOME", &who.home);
    }
    cmd.output().expect("pgwarden runs")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn pg_version(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("PG_VERSION"))
        .expect("PG_VERSION")
        .trim()
        .to_owned()
}

fn sibling(data_dir: &Path, suffix: &str) -> PathBuf {
    let mut name = data_dir.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// One member on 15 with a table of 20 000 rows; returns the environment and the checksum.
async fn member_with_data() -> (TestEnv, String) {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd starts");
    let i = env.add_member("pg0");
    env.start_member(i).expect("agent starts");
    assert_eq!(env.wait_for_leader(T).await, "pg0");
    let m = &env.members[0];
    m.sql(
        "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL, at timestamptz DEFAULT now()); \
         INSERT INTO t (id, v) SELECT g, md5(g::text) FROM generate_series(1, 20000) g; \
         CREATE INDEX t_v ON t (v)",
    )
    .await
    .expect("the primary accepts writes");
    let sum = m.sql(CHECKSUM).await.expect("checksum").remove(0);
    assert!(sum.starts_with("20000 "), "{sum}");
    (env, sum)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanly_stopped_member_is_upgraded_from_15_to_17_with_its_data() {
    let Some(pg17) = pg17_bin_dir() else { return };
    let (mut env, before) = member_with_data().await;
    let config = env.members[0].config_path();
    let data_dir = env.members[0].data_dir();

    // While the agent runs, its lock refuses the upgrade.
    let out = upgrade_data_dir(&config, Some(&pg17), None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("another pgwarden agent"),
        "{}",
        text(&out)
    );

    let agent = env.members[0].agent();
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let status = agent.wait_exit(T).expect("the agent exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");

    // Old binaries of the wrong version: refused before anything is written.
    let out = upgrade_data_dir(&config, Some(&pg17), Some(&pg17));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("the data directory is version 15, but the old binaries"),
        "{}",
        text(&out)
    );
    assert_eq!(pg_version(&data_dir), "15");
    assert!(!sibling(&data_dir, ".upgrade-new").exists());

    let out = upgrade_data_dir(&config, Some(&pg17), None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("upgraded from PostgreSQL 15 to 17"),
        "{}",
        text(&out)
    );
    assert_eq!(pg_version(&data_dir), "17");
    let kept = sibling(&data_dir, ".pre-upgrade-15");
    assert_eq!(pg_version(&kept), "15", "the old directory is kept");
    assert!(!sibling(&data_dir, ".upgrade-new").exists());
    for carried in [
        "postgresql.base.conf",
        "pg_hba.conf",
        "patroni.dynamic.json",
    ] {
        assert!(data_dir.join(carried).exists(), "{carried} carried over");
    }

    // The agent still on the 15 binaries: refused at its start, naming the fix, where postgres
    // would refuse the directory on every start.
    env.start_member(0).expect("agent starts");
    let status = env.members[0]
        .agent()
        .wait_exit(T)
        .expect("the agent exits");
    assert_eq!(status.code(), Some(1));
    let log = env.members[0].log_text();
    assert!(
        log.contains("the data directory is PostgreSQL 17, but the binaries chosen for it"),
        "{}",
        env.members[0].log_tail(20)
    );

    // The agent on the new binaries: the same member leads again, on 17, with every row; a
    // password login over TCP shows the carried pg_hba.conf and the kept role passwords.
    let m = env.member("pg0");
    m.set(
        "postgresql.bin_dir",
        serde_yaml::Value::String(pg17.display().to_string()),
    );
    env.start_member(0).expect("agent starts on 17");
    assert_eq!(env.wait_for_leader(T).await, "pg0");
    let m = &env.members[0];
    wait_until("the upgraded primary accepts connections", T, || async {
        m.sql("SELECT 1").await.is_ok()
    })
    .await;
    let version = m
        .sql("SELECT current_setting('server_version_num')")
        .await
        .expect("sql");
    assert!(
        version[0].starts_with("17"),
        "server_version_num {version:?}"
    );
    assert_eq!(m.sql(CHECKSUM).await.expect("checksum").remove(0), before);
    // pg_upgrade's cluster has its initdb's system identifier; `initialize` records it.
    let sysid = m
        .sql("SELECT system_identifier::text FROM pg_control_system()")
        .await
        .expect("sql")
        .remove(0);
    assert_eq!(
        env.etcd.get(&env.key("initialize")).await.expect("etcd"),
        Some(sysid)
    );
    m.sql("INSERT INTO t (id, v) VALUES (20001, 'after')")
        .await
        .expect("the upgraded primary accepts writes");
    assert_eq!(
        m.sql("SELECT pg_is_in_recovery()::text")
            .await
            .expect("sql"),
        vec!["false"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_crashed_is_not_upgraded_and_its_directory_is_left_alone() {
    let Some(pg17) = pg17_bin_dir() else { return };
    let (mut env, _) = member_with_data().await;
    let config = env.members[0].config_path();
    let data_dir = env.members[0].data_dir();
    // Whether the postmaster ends by the parent-death signal (removing postmaster.pid) or by
    // the SIGKILL (leaving it) is a race: both must be refused for the unclean shutdown.
    env.members[0].kill9_with_postmaster();
    let _ = env.members[0].agent().wait_exit(T);

    let out = upgrade_data_dir(&config, Some(&pg17), None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // Refused for the unclean shutdown, or, while the killed postmaster is still a zombie
    // nobody has reaped (its parent, the agent, is gone too), for a process that still has
    // its PID.
    assert!(
        text(&out).contains("InProduction, not \"shut down\"")
            || text(&out).contains("postmaster.pid names a live process"),
        "{}",
        text(&out)
    );
    assert_eq!(pg_version(&data_dir), "15");
    assert!(!sibling(&data_dir, ".upgrade-new").exists());
    assert!(!sibling(&data_dir, ".pre-upgrade-15").exists());

    // The SIGKILL case for certain: a postmaster.pid whose process is gone.
    let mut gone = Command::new("true").spawn().expect("spawn");
    let dead_pid = gone.id();
    gone.wait().expect("wait");
    std::fs::write(
        data_dir.join("postmaster.pid"),
        format!("{dead_pid}\n{}\n", data_dir.display()),
    )
    .expect("write postmaster.pid");
    let out = upgrade_data_dir(&config, Some(&pg17), None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("InProduction, not \"shut down\""),
        "{}",
        text(&out)
    );
    assert_eq!(pg_version(&data_dir), "15");
    assert!(!sibling(&data_dir, ".upgrade-new").exists());
}

fn stop(env: &mut TestEnv, name: &str) {
    let agent = env.member(name).agent();
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let status = agent.wait_exit(T).expect("the agent exits after SIGTERM");
    assert!(status.success(), "{name}: exit status {status:?}");
}

/// The whole procedure of docs/upgrade.md on a three-member cluster: replicas stopped, then the
/// leader; every member's configuration gets `postgresql.bin_dirs` with 15 and 17; the leader's
/// data is upgraded, the replicas' moved aside; started again, the leader runs 17 on the
/// upgraded data, the replicas clone it on 17 and stream, every member has every row, and a
/// switchover works: the cluster is HA again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_cluster_is_upgraded_from_15_to_17_and_is_ha_again() {
    let Some(pg17) = pg17_bin_dir() else { return };
    let pg15 = PathBuf::from(
        std::env::var("PGWARDEN_PG_BIN_DIR")
            .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
    );
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd starts");
    for name in ["pg0", "pg1", "pg2"] {
        env.add_member(name);
    }
    for i in 0..3 {
        env.start_member(i).expect("agent starts");
    }
    let leader = env.wait_for_leader(T).await;
    env.wait_for_streaming(&leader, 2, T).await;
    let l = env
        .members
        .iter()
        .find(|m| m.name == leader)
        .expect("leader");
    l.sql(
        "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL); \
         INSERT INTO t (id, v) SELECT g, md5(g::text) FROM generate_series(1, 20000) g",
    )
    .await
    .expect("the primary accepts writes");
    let before = l.sql(CHECKSUM).await.expect("checksum").remove(0);
    // No lag: every replica has replayed every row before the cluster stops.
    for m in env.members.iter().filter(|m| m.name != leader) {
        wait_until(&format!("{} has every row", m.name), T, || async {
            m.sql(CHECKSUM).await.ok().and_then(|mut r| r.pop()) == Some(before.clone())
        })
        .await;
    }
    let replicas: Vec<String> = env
        .members
        .iter()
        .map(|m| m.name.clone())
        .filter(|n| *n != leader)
        .collect();
    for name in &replicas {
        stop(&mut env, name);
    }
    stop(&mut env, &leader);

    let mut bin_dirs = serde_yaml::Mapping::new();
    bin_dirs.insert(15.into(), pg15.display().to_string().into());
    bin_dirs.insert(17.into(), pg17.display().to_string().into());
    for m in &mut env.members {
        m.set(
            "postgresql.bin_dirs",
            serde_yaml::Value::Mapping(bin_dirs.clone()),
        );
        m.write_config().expect("config written");
    }
    // The new binaries come from `bin_dirs` (the newest entry), the old from its 15 entry.
    let l = env
        .members
        .iter()
        .find(|m| m.name == leader)
        .expect("leader");
    let out = upgrade_data_dir(&l.config_path(), None, None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("upgraded from PostgreSQL 15 to 17"),
        "{}",
        text(&out)
    );
    for name in &replicas {
        let m = env
            .members
            .iter()
            .find(|m| m.name == *name)
            .expect("replica");
        let out = upgrade_data_dir(&m.config_path(), None, None);
        assert!(out.status.success(), "{name}: {}", text(&out));
        assert!(text(&out).contains("moved aside"), "{name}: {}", text(&out));
        assert!(!m.data_dir().exists());
    }

    let i = env
        .members
        .iter()
        .position(|m| m.name == leader)
        .expect("leader");
    env.start_member(i).expect("the leader's agent starts");
    assert_eq!(env.wait_for_leader(T).await, leader);
    for name in &replicas {
        let i = env
            .members
            .iter()
            .position(|m| m.name == *name)
            .expect("replica");
        env.start_member(i).expect("a replica's agent starts");
    }
    env.wait_for_streaming(&leader, 2, T).await;
    for m in &env.members {
        let version = m
            .sql("SELECT current_setting('server_version_num')")
            .await
            .expect("sql");
        assert!(version[0].starts_with("17"), "{}: {version:?}", m.name);
        assert_eq!(pg_version(&m.data_dir()), "17", "{}", m.name);
        wait_until(&format!("{} has every row", m.name), T, || async {
            m.sql(CHECKSUM).await.ok().and_then(|mut r| r.pop()) == Some(before.clone())
        })
        .await;
    }

    // HA again: a switchover to a re-cloned replica, and the old leader follows it.
    let candidate = replicas[0].clone();
    let body = format!(r#"{{"leader": "{leader}", "candidate": "{candidate}"}}"#);
    let (code, answer) = env
        .member(&leader)
        .api_request("POST", "/switchover", Some(&body))
        .await
        .expect("answers");
    assert_eq!(code, 200, "{answer}");
    env.wait_for_streaming(&candidate, 2, T).await;
    assert_eq!(env.leader().await.as_deref(), Some(candidate.as_str()));
    let c = env
        .members
        .iter()
        .find(|m| m.name == candidate)
        .expect("candidate");
    c.sql("INSERT INTO t (id, v) VALUES (20001, 'after the switchover')")
        .await
        .expect("the new primary accepts writes");
}

/// The leader stopped first, by mistake: a replica took over, so the old leader's data is no
/// longer the cluster's latest. Its upgrade is refused, naming the running leader, and nothing
/// changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_is_not_upgraded_while_another_member_leads() {
    let Some(pg17) = pg17_bin_dir() else { return };
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd starts");
    for name in ["pg0", "pg1"] {
        env.add_member(name);
    }
    for i in 0..2 {
        env.start_member(i).expect("agent starts");
    }
    let leader = env.wait_for_leader(T).await;
    env.wait_for_streaming(&leader, 1, T).await;
    stop(&mut env, &leader);
    wait_until("the replica takes over", T, || async {
        env.leader().await.is_some_and(|l| l != leader)
    })
    .await;
    let new_leader = env.leader().await.expect("leader");

    let m = env
        .members
        .iter()
        .find(|m| m.name == leader)
        .expect("member");
    let out = upgrade_data_dir(&m.config_path(), Some(&pg17), None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "the leader \"{new_leader}\" is running in the cluster"
        )),
        "{}",
        text(&out)
    );
    assert_eq!(pg_version(&m.data_dir()), "15");
    assert!(!sibling(&m.data_dir(), ".upgrade-new").exists());
    assert!(!sibling(&m.data_dir(), ".pre-upgrade-15").exists());
}
