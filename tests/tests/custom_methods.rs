//! Custom bootstrap and replica creation methods and `bootstrap.post_bootstrap` on real
//! PostgreSQL 15, as Patroni 4.1 runs them: a new cluster made by a user's script (here a copy
//! of another cluster with pg_basebackup), started in recovery with `recovery_conf` until it
//! promotes; a failing script that leaves nothing behind; a method without a command refused by
//! its path; replicas made by a user's script, and a failing method followed by the next one.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use pgwarden_tests::harness::{agent_binary, wait_until, ClusterOptions, TestEnv};

const T: Duration = Duration::from_secs(90);

fn yaml(text: &str) -> serde_yaml::Value {
    serde_yaml::from_str(text).expect("valid YAML")
}

fn script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write the script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn pg_bin() -> String {
    std::env::var("PGWARDEN_PG_BIN_DIR").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_bootstrap_copies_another_cluster_recovers_promotes_and_runs_post_bootstrap() {
    let mut env = TestEnv::start(ClusterOptions {
        scope: "origin".into(),
        ..Default::default()
    })
    .await
    .expect("etcd");
    let i = env.add_member("a0");
    env.start_member(i).expect("start a0");
    env.wait_for_leader(T).await;
    let a = &env.members[i];
    a.sql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)")
        .await
        .expect("rows");
    let origin_sysid = a
        .sql("SELECT system_identifier::text FROM pg_control_system()")
        .await
        .expect("sysid");
    let origin_port = a.pg_port;

    // b0, a new cluster `copy`, bootstraps by copying a0 with the user's script. The script
    // sleeps first, so that the member's state can be seen while it runs.
    let j = env.add_member("b0");
    let dir = env.members[j].dir.clone();
    std::fs::create_dir_all(&dir).expect("member dir");
    let clone = dir.join("clone.sh");
    script(
        &clone,
        &format!(
            "echo \"$@\" > {dir}/clone.args\nsleep 3\n\
             for a in \"$@\"; do case \"$a\" in --datadir=*) d=\"${{a#--datadir=}}\";; esac; done\n\
             PGPASSWORD=rep-secret exec {bin}/pg_basebackup -h 127.0.0.1 -p {origin_port} \
             -U replicator -D \"$d\" -X stream -c fast",
            dir = dir.display(),
            bin = pg_bin(),
        ),
    );
    let post = dir.join("post.sh");
    script(
        &post,
        &format!(
            "echo \"$1\" > {dir}/post.args\n\
             exec {bin}/psql \"$1\" -v ON_ERROR_STOP=1 -c 'CREATE TABLE made_by_post_bootstrap ()'",
            dir = dir.display(),
            bin = pg_bin(),
        ),
    );
    {
        let b = &mut env.members[j];
        b.set("scope", "copy".into());
        b.set("bootstrap.method", "clone".into());
        b.set(
            "bootstrap.clone",
            yaml(&format!(
                "command: {} --from a0\nsource_port: {origin_port}\nrecovery_conf:\n  \
                 recovery_target: immediate\n  recovery_target_action: promote\n  \
                 restore_command: /bin/false\n",
                clone.display()
            )),
        );
        b.set(
            "bootstrap.post_bootstrap",
            post.display().to_string().into(),
        );
    }
    env.start_member(j).expect("start b0");
    let b = &env.members[j];
    let started = Instant::now();
    let mut saw_custom_state = false;
    loop {
        assert!(
            started.elapsed() < T,
            "the copy never became a primary: {}",
            b.log_tail(40)
        );
        if let Some((200, body)) = b.api_get("/patroni").await {
            saw_custom_state |= body.contains("\"running custom bootstrap script\"");
        }
        if b.api_get("/primary").await.map(|r| r.0) == Some(200)
            && b.sql("SELECT pg_is_in_recovery()::text").await.ok() == Some(vec!["false".into()])
            && b.sql("SELECT count(*) FROM pg_tables WHERE tablename = 'made_by_post_bootstrap'")
                .await
                .ok()
                == Some(vec!["1".into()])
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        saw_custom_state,
        "/patroni said `running custom bootstrap script` while the script ran"
    );

    // The copy: a0's rows and system identifier, promoted to a timeline of its own at the end
    // of its recovery, without the recovery settings afterwards.
    assert_eq!(
        b.sql("SELECT count(*)::text FROM t").await.expect("rows"),
        vec!["10"]
    );
    assert_eq!(
        b.sql("SELECT system_identifier::text FROM pg_control_system()")
            .await
            .expect("sysid"),
        origin_sysid
    );
    assert_eq!(
        b.sql("SELECT timeline_id::text FROM pg_control_checkpoint()")
            .await
            .expect("timeline"),
        vec!["2"]
    );
    let data = b.data_dir();
    let auto = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap_or_default();
    assert!(
        !auto.contains("recovery_target") && !auto.contains("restore_command"),
        "{auto}"
    );
    assert!(!data.join("recovery.signal").exists());
    assert_eq!(
        b.sql("SHOW recovery_target").await.expect("setting"),
        vec![""]
    );

    // Patroni's arguments: the command's words, --scope, --datadir, then the other keys.
    let args = std::fs::read_to_string(dir.join("clone.args")).expect("the script ran");
    assert_eq!(
        args.trim(),
        format!(
            "--from a0 --scope=copy --datadir={} --source_port={origin_port}",
            data.display()
        )
    );
    let conninfo = std::fs::read_to_string(dir.join("post.args")).expect("post_bootstrap ran");
    assert_eq!(
        conninfo.trim(),
        format!(
            "dbname=postgres user=postgres host=127.0.0.1 port={}",
            b.pg_port
        )
    );
    // No password on any command line: post_bootstrap got a password file.
    assert!(!b.log_text().contains("su-secret"));
    assert_eq!(
        env.etcd
            .get("/service/copy/initialize")
            .await
            .expect("etcd"),
        Some(origin_sysid[0].clone())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_custom_bootstrap_leaves_nothing_behind_and_a_method_without_command_is_refused() {
    let mut env = TestEnv::start(ClusterOptions {
        scope: "broken".into(),
        ..Default::default()
    })
    .await
    .expect("etcd");
    let i = env.add_member("c0");
    let dir = env.members[i].dir.clone();
    std::fs::create_dir_all(&dir).expect("member dir");
    let fail = dir.join("fail.sh");
    // Leaves files behind, then fails: the agent must not take them for a cluster.
    script(
        &fail,
        "for a in \"$@\"; do case \"$a\" in --datadir=*) d=\"${a#--datadir=}\";; esac; done\n\
         echo 15 > \"$d/PG_VERSION\"\nexit 3",
    );
    {
        let c = &mut env.members[i];
        c.set("bootstrap.method", "broken_copy".into());
        c.set("bootstrap.broken_copy", yaml("source: nowhere\n"));
        c.write_config().expect("config");
    }
    // No command: refused by its path (Patroni would run initdb instead, silently).
    let out = std::process::Command::new(agent_binary())
        .arg("validate-config")
        .arg(env.members[i].config_path())
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bootstrap.broken_copy.command"), "{stderr}");

    env.members[i].set(
        "bootstrap.broken_copy",
        yaml(&format!("command: {}\n", fail.display())),
    );
    env.start_member(i).expect("start c0");
    let exit = env.members[i]
        .agent()
        .wait_exit(T)
        .expect("the failed bootstrap stops the agent");
    let c = &env.members[i];
    assert_eq!(exit.code(), Some(1), "{}", c.log_tail(40));
    let data = c.data_dir();
    assert!(
        std::fs::read_dir(&data).map_or(true, |mut d| d.next().is_none()),
        "the failed bootstrap left files in {}",
        data.display()
    );
    for key in ["initialize", "leader"] {
        assert_eq!(
            env.etcd
                .get(&format!("/service/broken/{key}"))
                .await
                .expect("etcd"),
            None,
            "`{key}` left behind by the failed bootstrap"
        );
    }
    let log = c.log_text();
    assert!(
        log.contains("the custom bootstrap failed") && log.contains("exit status: 3"),
        "{}",
        c.log_tail(40)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_replica_methods_get_patronis_arguments_and_a_failing_one_falls_through() {
    let mut env = TestEnv::start(ClusterOptions {
        scope: "methods".into(),
        ..Default::default()
    })
    .await
    .expect("etcd");
    let i = env.add_member("m0");
    env.start_member(i).expect("start m0");
    let leader = env.wait_for_leader(T).await;
    assert_eq!(leader, "m0");
    let leader_port = env.members[i].pg_port;

    // m1 clones with its own script (pg_basebackup through the connstring it is given, the
    // password from PGPASSFILE); m2's first method fails after leaving a file behind, then
    // basebackup makes the replica.
    for (name, methods) in [("m1", "[copy, basebackup]"), ("m2", "[broken, basebackup]")] {
        let j = env.add_member(name);
        let dir = env.members[j].dir.clone();
        std::fs::create_dir_all(&dir).expect("member dir");
        let copy = dir.join("copy.sh");
        script(
            &copy,
            &format!(
                "echo \"$@\" > {dir}/copy.args\n\
                 for a in \"$@\"; do case \"$a\" in --datadir=*) d=\"${{a#--datadir=}}\";; \
                 --connstring=*) c=\"${{a#--connstring=}}\";; esac; done\n\
                 [ -n \"$PGPASSFILE\" ] || exit 9\n\
                 exec {bin}/pg_basebackup -d \"$c\" -D \"$d\" -X stream -c fast",
                dir = dir.display(),
                bin = pg_bin(),
            ),
        );
        let broken = dir.join("broken.sh");
        script(
            &broken,
            "for a in \"$@\"; do case \"$a\" in --datadir=*) d=\"${a#--datadir=}\";; esac; done\n\
             echo junk > \"$d/junk\"\nexit 4",
        );
        let m = &mut env.members[j];
        m.set("postgresql.create_replica_methods", yaml(methods));
        m.set(
            "postgresql.copy",
            yaml(&format!(
                "command: {} --verbose\nlabel: nightly\n",
                copy.display()
            )),
        );
        m.set(
            "postgresql.broken",
            yaml(&format!("command: {}\n", broken.display())),
        );
        env.start_member(j).expect("start");
    }
    wait_until("both replicas stream from m0", T, || async {
        env.members[1].is_streaming_replica().await && env.members[2].is_streaming_replica().await
    })
    .await;

    let m1 = &env.members[1];
    let args = std::fs::read_to_string(m1.dir.join("copy.args")).expect("the copy script ran");
    assert_eq!(
        args.trim(),
        format!(
            "--verbose --label=nightly --scope=methods --role=replica --datadir={} \
             --connstring=dbname=postgres user=replicator host=127.0.0.1 port={leader_port}",
            m1.data_dir().display()
        )
    );
    assert!(
        m1.log_text()
            .contains("creating the replica with a custom method"),
        "{}",
        m1.log_tail(30)
    );
    let m2 = &env.members[2];
    assert!(
        !m2.data_dir().join("junk").exists(),
        "the failed method's file was removed"
    );
    assert!(
        m2.log_text()
            .contains("replica creation method failed; trying the next one"),
        "{}",
        m2.log_tail(30)
    );
    assert!(!m1.log_text().contains("rep-secret") && !m2.log_text().contains("rep-secret"));
}

/// Patroni's `dcs_failsafe_mode.feature`, "new replica isn't promoted when leader is down":
/// with the leader stopped, an empty member whose replica method is marked `no_leader`
/// restores itself from a backup and runs as a replica without upstream; it is not in the
/// `failsafe` topology, so it does not take the lock. When the former leader comes back it
/// leads again, and the new member streams from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_leader_method_creates_a_replica_while_no_leader_runs() {
    let mut env = TestEnv::start(ClusterOptions {
        scope: "noleader".into(),
        ..Default::default()
    })
    .await
    .expect("etcd");
    let i = env.add_member("n0");
    env.members[i].set("bootstrap.dcs.failsafe_mode", true.into());
    env.start_member(i).expect("start n0");
    assert_eq!(env.wait_for_leader(T).await, "n0");
    wait_until("n0 publishes the failsafe topology", T, || async {
        env.members[i]
            .api_get("/failsafe")
            .await
            .is_some_and(|(code, body)| code == 200 && body.contains("n0"))
    })
    .await;
    env.members[i]
        .sql("CREATE TABLE before_backup (id int)")
        .await
        .expect("table");

    // The backup: a base backup of n0, readable by the agents' user.
    let backup = env.shared_dir("backup").join("data");
    let status = std::process::Command::new(format!("{}/pg_basebackup", pg_bin()))
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "replicator",
            "-X",
            "stream",
            "-c",
            "fast",
        ])
        .arg("-p")
        .arg(env.members[i].pg_port.to_string())
        .arg("-D")
        .arg(&backup)
        .env("PGPASSWORD", "rep-secret")
        .status()
        .expect("pg_basebackup runs");
    assert!(status.success(), "pg_basebackup failed");
    if let Some(who) = pgwarden_tests::harness::run_as() {
        let status = std::process::Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", who.uid, who.gid))
            .arg(&backup)
            .status()
            .expect("chown runs");
        assert!(status.success());
    }

    // n0 stops cleanly: the leader key is released.
    env.members[i]
        .agent()
        .signal(nix::sys::signal::Signal::SIGTERM);
    assert!(env.members[i]
        .agent()
        .wait_exit(Duration::from_secs(60))
        .is_some());
    assert_eq!(env.leader().await, None);

    let j = env.add_member("n1");
    let dir = env.members[j].dir.clone();
    std::fs::create_dir_all(&dir).expect("member dir");
    let restore = dir.join("restore.sh");
    script(
        &restore,
        &format!(
            "echo \"$@\" > {dir}/restore.args\n\
             for a in \"$@\"; do case \"$a\" in --datadir=*) d=\"${{a#--datadir=}}\";; esac; done\n\
             cp -a {backup}/. \"$d\"/",
            dir = dir.display(),
            backup = backup.display(),
        ),
    );
    {
        let m = &mut env.members[j];
        m.set(
            "postgresql.create_replica_methods",
            yaml("[from_backup, basebackup]"),
        );
        m.set(
            "postgresql.from_backup",
            yaml(&format!(
                "command: {}\nno_leader: true\nkeep_data: true\n",
                restore.display()
            )),
        );
    }
    env.start_member(j).expect("start n1");
    let n1 = &env.members[j];
    wait_until("n1 runs as a replica", T, || async {
        n1.sql("SELECT pg_is_in_recovery()::text").await.ok() == Some(vec!["true".into()])
    })
    .await;
    // Several cycles without a leader: n1 is not in the topology and stays a replica.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(env.leader().await, None, "{}", n1.log_tail(30));
    assert_eq!(
        n1.sql("SELECT pg_is_in_recovery()::text").await.ok(),
        Some(vec!["true".into()])
    );
    let args = std::fs::read_to_string(dir.join("restore.args")).expect("the script ran");
    assert!(
        args.contains("--connstring= ") || args.trim_end().ends_with("--connstring="),
        "{args}"
    );
    assert!(
        n1.log_text()
            .contains("failsafe mode: the `failsafe` key does not name this member"),
        "{}",
        n1.log_tail(30)
    );

    env.members[i].restart().expect("restart n0");
    assert_eq!(env.wait_for_leader(T).await, "n0");
    wait_until("n1 streams from n0", T, || async {
        env.members[j].is_streaming_replica().await
    })
    .await;
}
