//! pgBackRest under the agent, with Debian's real pgBackRest and a posix repository in the test
//! directory: archiving and `check` on a fresh cluster, scheduled backups only on the leader
//! and only once per fire across a failover, no WAL gap after a failover, replicas restored
//! from the repository, point-in-time bootstrap of a new cluster, and a broken repository that
//! is reported without touching postgres; an S3 repository (moto, see the harness) for
//! archiving, backups and replica restores.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pgwarden_tests::harness::s3::S3Server;
use pgwarden_tests::harness::{wait_until, ClusterOptions, Member, TestEnv};
use serde_json::Value;

const T: Duration = Duration::from_secs(180);

fn yaml(text: &str) -> serde_yaml::Value {
    serde_yaml::from_str(text).expect("valid YAML")
}

/// The `pgbackrest` section for a repository at `repo`.
fn section(repo: &Path, stanza: &str, extra: &str) -> serde_yaml::Value {
    yaml(&format!(
        "stanza: {stanza}\nrepos:\n  - type: posix\n    path: {}\n    retention_full: 2\n\
         compress_type: lz4\nprocess_max: 1\ntimeout: 300\noptions:\n  archive-timeout: 30\n{extra}",
        repo.display()
    ))
}

/// The `pgbackrest` object of a member's `/patroni`.
async fn report(m: &Member) -> Value {
    match m.api_get("/patroni").await {
        Some((200, body)) => {
            serde_json::from_str::<Value>(&body).unwrap_or(Value::Null)["pgbackrest"].clone()
        }
        _ => Value::Null,
    }
}

/// `m`'s stanza exists and `pgbackrest check` passed (the report says so).
async fn wait_stanza_checked(m: &Member) {
    wait_until(&format!("{}'s stanza check passed", m.name), T, || async {
        report(m).await["check"]["ok"] == Value::Bool(true)
    })
    .await;
}

/// Table `t` with rows 1 to 10 on the leader `m`, then a full backup through the CLI (which
/// waits for its end).
async fn ten_rows_and_a_full_backup(m: &Member) {
    m.sql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)")
        .await
        .expect("rows 1-10");
    let out = cli(m, &["backup", "--type", "full"]);
    assert!(
        out.status.success(),
        "pgwarden backup failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A cluster `scope` of one member `name`, leading and archiving into a fresh repository
/// (stanza `scope`) whose check passed.
async fn archiving_cluster_of_one(scope: &str, name: &str) -> (TestEnv, PathBuf) {
    let mut env = TestEnv::start(ClusterOptions {
        scope: scope.into(),
        ..Default::default()
    })
    .await
    .expect("etcd");
    let repo = env.shared_dir("repo");
    let i = env.add_member(name);
    env.members[i].set("pgbackrest", section(&repo, scope, ""));
    env.start_member(i).expect("start");
    env.wait_for_leader(T).await;
    wait_stanza_checked(&env.members[i]).await;
    (env, repo)
}

fn member<'a>(env: &'a TestEnv, name: &str) -> &'a Member {
    env.members
        .iter()
        .find(|m| m.name == name)
        .expect("member exists")
}

/// `fire=` values of the scheduled backups a member started, from its log.
fn scheduled_fires(m: &Member) -> Vec<String> {
    m.log_text()
        .lines()
        .filter(|l| l.contains("starting the scheduled backup"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("fire=").map(str::to_owned))
        })
        .collect()
}

/// Complete WAL segments in the repository's archive: (timeline, segment number).
fn archived_segments(repo: &Path) -> BTreeSet<(u32, u64)> {
    fn walk(dir: &Path, out: &mut BTreeSet<(u32, u64)>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, out);
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if name.len() > 25
                && name.as_bytes()[24] == b'-'
                && name[..24].bytes().all(|b| b.is_ascii_hexdigit())
            {
                let tl = u32::from_str_radix(&name[..8], 16).expect("hex");
                let log = u64::from_str_radix(&name[8..16], 16).expect("hex");
                let seg = u64::from_str_radix(&name[16..24], 16).expect("hex");
                out.insert((tl, log * 0x100 + seg));
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&repo.join("archive"), &mut out);
    out
}

fn segment_number(walfile: &str) -> u64 {
    let log = u64::from_str_radix(&walfile[8..16], 16).expect("hex");
    let seg = u64::from_str_radix(&walfile[16..24], 16).expect("hex");
    log * 0x100 + seg
}

/// Switches to a new WAL segment on `m` and waits until the finished one is in the repository.
async fn switch_and_wait_archived(m: &Member, repo: &Path) -> u64 {
    let file = m
        .sql("SELECT pg_walfile_name(pg_switch_wal())")
        .await
        .expect("switch WAL")[0]
        .clone();
    let segno = segment_number(&file);
    wait_until(&format!("{file} is archived"), T, || async {
        archived_segments(repo).iter().any(|(_, s)| *s == segno)
    })
    .await;
    segno
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_scheduled_backups_replicas_and_failover_keep_the_wal_history_whole() {
    let mut env = TestEnv::start(ClusterOptions {
        scope: "backrest".into(),
        ..Default::default()
    })
    .await
    .expect("etcd");
    let repo = env.shared_dir("repo");
    let (wrapper, slow) = slow_backup_wrapper(&env);
    for name in ["pg0", "pg1", "pg2"] {
        let i = env.add_member(name);
        env.members[i].set(
            "pgbackrest",
            section(
                &repo,
                "main",
                &format!(
                    "schedule:\n  incr: '*/20 * * * * *'\ncommand: {}\n",
                    wrapper.display()
                ),
            ),
        );
        env.members[i].set(
            "postgresql.create_replica_methods",
            yaml("[pgbackrest, basebackup]"),
        );
    }
    for i in 0..3 {
        env.start_member(i).expect("start");
    }
    let leader = env.wait_for_leader(T).await;

    // A fresh cluster: stanza created and `pgbackrest check` passed on the leader, WAL archived.
    wait_stanza_checked(member(&env, &leader)).await;
    switch_and_wait_archived(member(&env, &leader), &repo).await;
    let first = archived_segments(&repo);
    assert!(first.iter().any(|(tl, _)| *tl == 1), "{first:?}");

    // The replicas were cloned before any backup existed: pgbackrest failed and basebackup
    // took over, without a gap in the plan.
    for m in env.members.iter().filter(|m| m.name != leader) {
        wait_until(&format!("{} streams", m.name), T, || async {
            m.is_streaming_replica().await
        })
        .await;
        let log = m.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("replica created") && l.contains("basebackup")),
            "{}: no basebackup fallback in the log",
            m.name
        );
    }

    // A scheduled backup runs on the leader.
    wait_until("a scheduled backup succeeded on the leader", T, || async {
        let r = report(member(&env, &leader)).await;
        r["last"]["ok"] == Value::Bool(true) && r["last"]["trigger"] == "scheduled"
    })
    .await;
    for m in env.members.iter().filter(|m| m.name != leader) {
        assert!(
            scheduled_fires(m).is_empty(),
            "{} ran a scheduled backup while not the leader",
            m.name
        );
        assert!(report(m).await["running"].is_null());
    }

    // Re-created with a backup in the repository, a replica is restored from it, not cloned.
    let replica = env
        .members
        .iter()
        .find(|m| m.name != leader)
        .expect("a replica")
        .name
        .clone();
    let before = member(&env, &replica)
        .log_text()
        .matches("replica created")
        .count();
    let (code, body) = member(&env, &replica)
        .api_request("POST", "/reinitialize", Some("{\"force\": true}"))
        .await
        .expect("reinitialize answers");
    assert_eq!(code, 200, "{body}");
    wait_until(
        &format!("{replica} was restored by pgbackrest"),
        T,
        || async {
            let log = member(&env, &replica).log_text();
            log.lines()
                .filter(|l| l.contains("replica created"))
                .skip(before)
                .any(|l| l.contains("pgbackrest"))
        },
    )
    .await;
    wait_until(&format!("{replica} streams again"), T, || async {
        member(&env, &replica).is_streaming_replica().await
    })
    .await;

    // Fail over by killing the leader's agent (its postgres dies with it).
    let old = leader.clone();
    let marker = member(&env, &old)
        .sql("SELECT pg_walfile_name(pg_current_wal_lsn())")
        .await
        .expect("position")[0]
        .clone();
    env.member(&old).agent().kill9();
    let deadline = std::time::Instant::now() + T;
    let new_leader = loop {
        if let Some(l) = env.leader().await.filter(|l| *l != old) {
            if member(&env, &l).api_get("/primary").await.map(|r| r.0) == Some(200) {
                break l;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let new = member(&env, &new_leader);
    wait_stanza_checked(new).await;
    let after = switch_and_wait_archived(new, &repo).await;
    assert!(after >= segment_number(&marker));
    let archived = archived_segments(&repo);
    assert!(
        archived.iter().any(|(tl, _)| *tl >= 2),
        "no segment of the new timeline archived: {archived:?}"
    );
    let numbers: BTreeSet<u64> = archived.iter().map(|(_, s)| *s).collect();
    let (lo, hi) = (
        *numbers.first().expect("segments"),
        *numbers.last().expect("segments"),
    );
    let missing: Vec<u64> = (lo..=hi).filter(|s| !numbers.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "WAL segments missing from the archive: {missing:?} (archived {archived:?})"
    );

    // The next scheduled backup runs on the new leader, and no fire ran twice.
    let started = chrono::Utc::now();
    wait_until(
        "a scheduled backup succeeded on the new leader",
        T,
        || async {
            let r = report(new).await;
            r["last"]["ok"] == Value::Bool(true)
                && r["last"]["trigger"] == "scheduled"
                && r["last"]["started_at"]
                    .as_str()
                    .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                    .is_some_and(|t| t > started)
        },
    )
    .await;
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for m in &env.members {
        for fire in scheduled_fires(m) {
            if let Some(other) = seen.insert(fire.clone(), m.name.clone()) {
                panic!("the fire {fire} ran on both {other} and {}", m.name);
            }
        }
    }
    let info = new.api_get("/backups").await.expect("/backups answers");
    assert_eq!(info.0, 200, "{}", info.1);
    let info: Value = serde_json::from_str(&info.1).expect("JSON");
    assert!(
        info[0]["backup"].as_array().is_some_and(|b| b.len() >= 2),
        "{info}"
    );
    let metrics = new.api_get("/metrics").await.expect("metrics").1;
    assert!(
        metrics.contains("pgwarden_backup_last_success_time{"),
        "{metrics}"
    );
    assert!(metrics.contains("pgwarden_backup_repo_ok{"), "{metrics}");

    // A switchover scheduled for later does not stop the schedules meanwhile.
    let candidate = env
        .members
        .iter()
        .map(|m| m.name.clone())
        .find(|n| *n != new_leader && *n != old)
        .expect("a candidate");
    let c = member(&env, &candidate);
    wait_until(
        &format!("{candidate} streams from {new_leader}"),
        T,
        || async { c.is_streaming_replica().await },
    )
    .await;
    let at = (chrono::Utc::now() + chrono::Duration::seconds(600)).to_rfc3339();
    let body = format!(
        r#"{{"leader": "{new_leader}", "candidate": "{candidate}", "scheduled_at": "{at}"}}"#
    );
    let (code, text) = new
        .api_request("POST", "/switchover", Some(&body))
        .await
        .expect("answers");
    assert_eq!(code, 202, "{text}");
    let scheduled = chrono::Utc::now();
    wait_until(
        "a scheduled backup ran while the switchover was pending",
        T,
        || async {
            let r = report(new).await;
            r["last"]["ok"] == Value::Bool(true)
                && r["last"]["trigger"] == "scheduled"
                && r["last"]["started_at"]
                    .as_str()
                    .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                    .is_some_and(|t| t > scheduled)
        },
    )
    .await;
    let (code, text) = new
        .api_request("DELETE", "/switchover", None)
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");

    // A backup running when a switchover is requested is interrupted, and its run is not
    // lost: the new leader runs it (it used to skip it as "already ran on a previous leader").
    std::fs::write(&slow, "").expect("slow backups on");
    let slow_from = chrono::Utc::now();
    wait_until("a slow scheduled backup runs on the leader", T, || async {
        let r = report(new).await;
        r["running"]["trigger"] == "scheduled"
            && r["running"]["started_at"]
                .as_str()
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                .is_some_and(|t| t > slow_from)
    })
    .await;
    let fire = scheduled_fires(new).last().cloned().expect("its fire");
    std::fs::remove_file(&slow).expect("slow backups off");
    let body = format!(r#"{{"leader": "{new_leader}", "candidate": "{candidate}"}}"#);
    let (code, text) = new
        .api_request("POST", "/switchover", Some(&body))
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");
    wait_until(
        &format!("{candidate} ran the interrupted run of {fire}"),
        T,
        || async {
            scheduled_fires(c)
                .iter()
                .any(|f| f.as_str() >= fire.as_str())
                && report(c).await["last"]["ok"] == Value::Bool(true)
        },
    )
    .await;
    assert!(
        !c.log_text()
            .lines()
            .any(|l| l.contains("already ran on a previous leader") && l.contains(&fire)),
        "{candidate} skipped the interrupted run:\n{}",
        c.log_tail(60)
    );
    wait_until("the former leader reported the interruption", T, || async {
        new.log_text().contains("backup interrupted") && report(new).await["running"].is_null()
    })
    .await;

    // A fire missed while a backup still runs is logged with its reason and counted.
    std::fs::write(&slow, "").expect("slow backups on");
    wait_until("a missed scheduled backup is counted", T, || async {
        c.api_get("/metrics").await.is_some_and(|(_, text)| {
            text.lines().any(|l| {
                l.starts_with("pgwarden_backup_missed{")
                    && l.contains("repo=\"repo1\",type=\"incr\"")
                    && !l.ends_with(" 0")
                    && !l.ends_with(" 0.0")
            })
        })
    })
    .await;
    assert!(
        c.log_text()
            .lines()
            .any(|l| l.contains("scheduled backup missed") && l.contains("backup was running")),
        "{}",
        c.log_tail(40)
    );
    std::fs::remove_file(&slow).expect("slow backups off");
}

/// A `pgbackrest` wrapper whose backups sleep (until killed) while the returned flag file
/// exists: a backup that is surely still running when the test acts.
fn slow_backup_wrapper(env: &TestEnv) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = env.shared_dir("bin");
    let flag = dir.join("slow-backups");
    let wrapper = dir.join("pgbackrest");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do\n  if [ \"$a\" = backup ] && [ -e {} ]; then sleep 120; fi\n\
             done\nexec pgbackrest \"$@\"\n",
            flag.display()
        ),
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (wrapper, flag)
}

/// A `pgbackrest` wrapper whose backups compress with zstd at level 19 in one process: a real
/// backup of a small cluster lasts tens of seconds, while `archive-push` and the other
/// commands keep the member's fast settings (postgres' shutdown waits for its archiver).
fn slow_compression_wrapper(env: &TestEnv) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = env.shared_dir("slow-bin");
    let wrapper = dir.join("pgbackrest");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\nfor a in \"$@\"; do\n  if [ \"$a\" = backup ]; then\n    \
         exec pgbackrest \"$@\" --compress-type=zst --compress-level=19 --process-max=1\n  fi\n\
         done\nexec pgbackrest \"$@\"\n",
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    wrapper
}

/// Where `needle` first occurs in `log` after byte `from`.
fn position(log: &str, from: usize, needle: &str) -> Option<usize> {
    log[from..].find(needle).map(|p| p + from)
}

/// A real backup (slowed down) running when postgres is stopped on purpose is ended first and
/// recorded as interrupted, not failed: at `POST /restart` of the leader (which then runs the
/// fire again itself), and at a switchover (the new leader runs it). Main's agent stopped
/// postgres under the running backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_running_at_a_switchover_ends_before_postgres_stops_and_the_new_leader_reruns_it()
{
    let mut env = TestEnv::start(ClusterOptions {
        scope: "interrupt".into(),
        ..Default::default()
    })
    .await
    .expect("etcd");
    let repo = env.shared_dir("repo");
    let slow = slow_compression_wrapper(&env);
    // Every minute at one second: the same fires on both members. The backup lock, held here
    // as if another member ran a backup, keeps the fire waiting until the data is in place.
    let second = (chrono::Utc::now() + chrono::Duration::seconds(20)).format("%S");
    env.etcd
        .put(&env.key("backup_lock"), r#"{"member":"the test"}"#)
        .await
        .expect("hold the backup lock");
    for name in ["pg0", "pg1"] {
        let i = env.add_member(name);
        let command = if name == "pg0" {
            format!("command: {}\n", slow.display())
        } else {
            String::new()
        };
        env.members[i].set(
            "pgbackrest",
            section(
                &repo,
                "interrupt",
                &format!("schedule:\n  full: '{second} * * * * *'\n{command}"),
            ),
        );
    }
    env.start_member(0).expect("start pg0");
    wait_until("pg0 leads", T, || async {
        env.leader().await.as_deref() == Some("pg0")
    })
    .await;
    env.start_member(1).expect("start pg1");
    let (old, new) = (member(&env, "pg0"), member(&env, "pg1"));
    wait_stanza_checked(old).await;
    old.sql(
        "CREATE TABLE filler AS SELECT g, md5(g::text) || md5((g + 1)::text) AS t \
         FROM generate_series(1, 200000) g",
    )
    .await
    .expect("filler rows");
    wait_until("pg1 streams from pg0", T, || async {
        new.is_streaming_replica().await
    })
    .await;

    // The scheduled full backup starts on pg0 (zstd level 19: it runs for a while).
    env.etcd
        .delete(&env.key("backup_lock"))
        .await
        .expect("release the backup lock");
    wait_until("the scheduled backup runs on pg0", T, || async {
        report(old).await["running"]["trigger"] == "scheduled"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // `POST /restart` of the leader ends it first too; pg0 stays the leader and runs the
    // handed-back fire again once postgres is back (after the 30 s hold).
    let from = old.log_text().len();
    let restarted_at = chrono::Utc::now();
    let (code, text) = old
        .api_request("POST", "/restart", Some("{}"))
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");
    let log = old.log_text();
    let ending = position(
        &log,
        from,
        "ending the running backup before postgres stops",
    );
    let ended = position(&log, from, "backup interrupted");
    assert!(
        ending.is_some() && ended.is_some() && log[from..].contains("a restart of postgres"),
        "{}",
        &log[from..]
    );
    assert_eq!(report(old).await["last"]["interrupted"], Value::Bool(true));
    assert_eq!(report(old).await["failures"], 0);
    wait_until("pg0 runs the interrupted fire again", T, || async {
        let r = report(old).await;
        r["running"]["trigger"] == "scheduled"
            && r["running"]["started_at"]
                .as_str()
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                .is_some_and(|t| t > restarted_at)
    })
    .await;
    let fire = scheduled_fires(old).last().cloned().expect("its fire");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let from = old.log_text().len();
    let (code, text) = old
        .api_request(
            "POST",
            "/switchover",
            Some(r#"{"leader": "pg0", "candidate": "pg1"}"#),
        )
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");
    wait_until("pg1 leads", T, || async {
        env.leader().await.as_deref() == Some("pg1")
            && new.api_get("/primary").await.map(|r| r.0) == Some(200)
    })
    .await;

    // pg0 ended its backup before it stopped postgres, and recorded it as interrupted.
    let log = old.log_text();
    let ended = position(&log, from, "backup interrupted");
    let stopped = position(&log, from, "stopping postgres");
    assert!(
        ended.is_some() && stopped.is_some() && ended < stopped,
        "the backup did not end before postgres stopped (ended at {ended:?}, stop at \
         {stopped:?}):\n{}",
        &log[from..]
    );
    assert!(!log[from..].contains("backup failed"), "{}", &log[from..]);
    wait_until("pg0 reports the run as interrupted", T, || async {
        let r = report(old).await;
        r["last"]["interrupted"] == Value::Bool(true)
            && r["last"]["trigger"] == "scheduled"
            && r["failures"] == 0
    })
    .await;

    // pg1 runs the interrupted fire (or a newer one), and it completes.
    wait_until(
        &format!("pg1 ran the interrupted run of {fire}"),
        T,
        || async {
            scheduled_fires(new)
                .iter()
                .any(|f| f.as_str() >= fire.as_str())
                && report(new).await["last"]["ok"] == Value::Bool(true)
        },
    )
    .await;
    assert!(
        !new.log_text()
            .lines()
            .any(|l| l.contains("already ran on a previous leader") && l.contains(&fire)),
        "pg1 skipped the interrupted run:\n{}",
        new.log_tail(60)
    );
}

/// Runs the CLI against the member's own config file.
fn cli(m: &Member, args: &[&str]) -> std::process::Output {
    std::process::Command::new(pgwarden_tests::harness::agent_binary())
        .arg("-c")
        .arg(m.config_path())
        .args(args)
        .output()
        .expect("the CLI runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_bootstrap_restores_exactly_the_rows_before_the_target() {
    let (mut env, repo) = archiving_cluster_of_one("origin", "a0").await;
    let a = member(&env, "a0");
    ten_rows_and_a_full_backup(a).await;
    let out = cli(a, &["backups"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("full"));

    // pgBackRest records backup stop times in whole seconds: keep the target clearly after it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    a.sql("INSERT INTO t SELECT generate_series(11, 20)")
        .await
        .expect("more rows");
    let target = a
        .sql("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")
        .await
        .expect("time")[0]
        .clone();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    a.sql("INSERT INTO t SELECT generate_series(21, 30)")
        .await
        .expect("rows after the target");
    switch_and_wait_archived(a, &repo).await;

    // A new cluster restored from the origin's stanza must archive into a stanza of its own:
    // one that names the source's stanza is refused by validate-config, with what to change.
    let j = env.add_member("b0");
    {
        let b = &mut env.members[j];
        b.set("scope", "restored".into());
        b.set("pgbackrest", section(&repo, "origin", ""));
        b.set("bootstrap.method", "pgbackrest".into());
        b.set("bootstrap.pgbackrest", yaml("stanza: origin\n"));
        b.write_config().expect("config");
    }
    let out = std::process::Command::new(pgwarden_tests::harness::agent_binary())
        .arg("validate-config")
        .arg(env.members[j].config_path())
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bootstrap.pgbackrest.stanza"), "{stderr}");
    assert!(
        stderr.contains("set pgbackrest.stanza to a new name"),
        "{stderr}"
    );

    // A target after the end of the archived WAL fails the bootstrap: the agent exits 1 and
    // leaves neither a half-restored data directory nor its keys behind.
    let bootstrap = |target: &str| {
        yaml(&format!(
            "stanza: origin\nrecovery_conf:\n  recovery_target_time: '{target}'\n  \
             recovery_target_action: promote\n"
        ))
    };
    env.members[j].set("pgbackrest", section(&repo, "restored", ""));
    // A day ahead, not 2099: pgBackRest 2.45 refuses a target after 2038 before restoring
    // ("unable to find backup set with stop time less than …"), so postgres' own end of WAL
    // was never reached here.
    let past_the_end = (chrono::Utc::now() + chrono::Duration::days(1))
        .format("%Y-%m-%d %H:%M:%S+00")
        .to_string();
    env.members[j].set("bootstrap.pgbackrest", bootstrap(&past_the_end));
    env.start_member(j).expect("start b0");
    let exit = env.members[j]
        .agent()
        .wait_exit(T)
        .expect("the failed bootstrap stops the agent");
    assert_eq!(exit.code(), Some(1), "{}", env.members[j].log_tail(40));
    let data = env.members[j].data_dir();
    assert!(
        std::fs::read_dir(&data).map_or(true, |mut d| d.next().is_none()),
        "the failed restore left files in {}",
        data.display()
    );
    for key in ["initialize", "leader"] {
        assert_eq!(
            env.etcd
                .get(&format!("/service/restored/{key}"))
                .await
                .expect("etcd"),
            None,
            "`{key}` left behind by the failed bootstrap"
        );
    }
    assert!(
        env.members[j]
            .log_text()
            .contains("so the next start restores afresh")
            && env.members[j]
                .log_text()
                .contains("recovery ended before configured recovery target was reached"),
        "{}",
        env.members[j].log_tail(40)
    );

    // Started again with a corrected target, it restores afresh: a new cluster, restored to
    // the target, archiving into its own stanza.
    let log_before = env.members[j].log_text().len();
    env.members[j].set("bootstrap.pgbackrest", bootstrap(&target));
    env.start_member(j).expect("start b0 again");
    let b = member(&env, "b0");
    // /primary answers 200 as soon as the lock is held (during the restore, as in Patroni):
    // wait for a running primary that answers queries.
    wait_until("the restored cluster is a running primary", T, || async {
        b.api_get("/health").await.map(|r| r.0) == Some(200)
            && b.api_get("/primary").await.map(|r| r.0) == Some(200)
            && b.sql("SELECT pg_is_in_recovery()::text").await.ok() == Some(vec!["false".into()])
    })
    .await;
    let rows = b
        .sql("SELECT count(*)::text || ':' || min(id)::text || ':' || max(id)::text FROM t")
        .await
        .expect("rows");
    assert_eq!(rows, vec!["20:1:20"], "exactly the rows before {target}");
    wait_until("the restored cluster created its own stanza", T, || async {
        report(b).await["check"]["ok"] == Value::Bool(true)
    })
    .await;
    let auto =
        std::fs::read_to_string(b.data_dir().join("postgresql.auto.conf")).unwrap_or_default();
    assert!(!auto.contains("recovery_target"), "{auto}");

    // Its first full backup runs right after the promotion, not at a first scheduled fire.
    wait_until("the restored cluster's first full backup", T, || async {
        let r = report(b).await;
        r["last"]["trigger"] == "bootstrap" && r["last"]["ok"] == Value::Bool(true)
    })
    .await;
    assert_eq!(report(b).await["last"]["type"], "full");
    // Then an incremental one: the full one's metrics stay.
    wait_until("an incremental backup is accepted", T, || async {
        b.api_request("POST", "/backup", Some("{\"type\": \"incr\"}"))
            .await
            .is_some_and(|(code, _)| code == 202)
    })
    .await;
    wait_until("the incremental backup succeeded", T, || async {
        let r = report(b).await;
        r["last"]["type"] == "incr" && r["last"]["ok"] == Value::Bool(true)
    })
    .await;
    wait_until("metrics for both backup types", T, || async {
        let text = b.api_get("/metrics").await.map(|r| r.1).unwrap_or_default();
        ["full", "incr"].iter().all(|t| {
            text.contains(&format!(
                "pgwarden_backup_last_size_bytes{{scope=\"restored\",name=\"b0\",repo=\"1\",type=\"{t}\"}}"
            ))
        })
    })
    .await;
    // No ERROR on a successful point-in-time bootstrap (WAL pushed before the new stanza
    // existed used to log one).
    let log = b.log_text();
    let errors: Vec<&str> = log[log_before..]
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("ERROR"))
        .collect();
    assert!(errors.is_empty(), "{}", errors.join("\n"));

    // A postgres that exits right after each start does not keep the leader key: after a few
    // failed starts in a row the lock is released, with the reason in the log.
    env.members[j]
        .agent()
        .signal(nix::sys::signal::Signal::SIGTERM);
    env.members[j].agent().wait_exit(T).expect("b0 stops");
    let auto_path = env.members[j].data_dir().join("postgresql.auto.conf");
    let auto = std::fs::read_to_string(&auto_path).expect("postgresql.auto.conf");
    std::fs::write(&auto_path, format!("{auto}shared_buffers = 'nonsense'\n")).expect("write");
    env.start_member(j).expect("start b0 with a broken setting");
    wait_until("the failing member released the leader key", T, || async {
        env.members[j]
            .log_text()
            .contains("releasing the leader lock instead of restarting postgres again")
            && env
                .etcd
                .get("/service/restored/leader")
                .await
                .ok()
                .flatten()
                .is_none()
    })
    .await;
    std::fs::write(&auto_path, auto).expect("write");
    let b = member(&env, "b0");
    wait_until("b0 leads again once postgres starts", T, || async {
        b.api_get("/primary").await.map(|r| r.0) == Some(200)
            && b.sql("SELECT pg_is_in_recovery()::text").await.ok() == Some(vec!["false".into()])
    })
    .await;

    // Bootstrapping again into the now existing stanza (the same scope reused after the
    // cluster was lost) is refused: pgBackRest would take the new timeline into the old
    // cluster's archive, since both have the same system identifier.
    env.members[j]
        .agent()
        .signal(nix::sys::signal::Signal::SIGTERM);
    env.members[j].agent().wait_exit(T).expect("b0 stops");
    std::fs::remove_dir_all(env.members[j].data_dir()).expect("remove the data directory");
    for (key, _) in env
        .etcd
        .get_prefix("/service/restored/")
        .await
        .expect("etcd")
    {
        env.etcd.delete(&key).await.expect("delete");
    }
    env.start_member(j).expect("start b0 on an empty directory");
    let exit = env.members[j]
        .agent()
        .wait_exit(T)
        .expect("the refused bootstrap stops the agent");
    assert_eq!(exit.code(), Some(1), "{}", env.members[j].log_tail(40));
    assert!(
        env.members[j]
            .log_text()
            .contains("already holds the backups or WAL of system"),
        "{}",
        env.members[j].log_tail(40)
    );

    // WAL that cannot reach the repository turns repo_ok to 0, with one WARN (not a line per
    // attempt), and back to 1 once archiving works again.
    use std::os::unix::fs::PermissionsExt;
    let a = member(&env, "a0");
    let archive_dir = repo.join("archive/origin");
    let repo_ok = |value: f64| async move {
        a.api_get("/metrics").await.is_some_and(|(_, text)| {
            text.lines().any(|l| {
                l.starts_with("pgwarden_backup_repo_ok{")
                    && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) == Some(value)
            })
        })
    };
    assert!(repo_ok(1.0).await);
    std::fs::set_permissions(&archive_dir, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    a.sql("INSERT INTO t VALUES (100); SELECT pg_switch_wal()")
        .await
        .expect("switch");
    wait_until("repo_ok shows the archive failure", T, || repo_ok(0.0)).await;
    wait_until("postgres retried the archive command", T, || async {
        a.api_get("/metrics").await.is_some_and(|(_, text)| {
            text.lines().any(|l| {
                l.starts_with("pgwarden_wal_archive_failed_count{")
                    && l.rsplit(' ')
                        .next()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(|v| v >= 3.0)
            })
        })
    })
    .await;
    let log = a.log_text();
    assert_eq!(
        log.matches("WAL archiving fails").count(),
        1,
        "{}",
        a.log_tail(40)
    );
    assert!(
        !log.contains("archive command failed"),
        "{}",
        a.log_tail(40)
    );
    std::fs::set_permissions(&archive_dir, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    a.sql("INSERT INTO t VALUES (101); SELECT pg_switch_wal()")
        .await
        .expect("switch");
    wait_until("repo_ok is back once archiving works", T, || repo_ok(1.0)).await;
    assert!(a.log_text().contains("WAL archiving works again"));

    // A new cluster (initdb) configured with a stanza that holds another system's backups is
    // refused before initdb, with what to change.
    let k = env.add_member("c0");
    env.members[k].set("scope", "other".into());
    env.members[k].set("pgbackrest", section(&repo, "origin", ""));
    env.start_member(k).expect("start c0");
    let exit = env.members[k]
        .agent()
        .wait_exit(T)
        .expect("the refused bootstrap stops the agent");
    assert_eq!(exit.code(), Some(1), "{}", env.members[k].log_tail(40));
    let log = env.members[k].log_text();
    assert!(
        log.contains("already holds the backups or WAL of system")
            && log.contains("set pgbackrest.stanza to a new name"),
        "{}",
        env.members[k].log_tail(40)
    );
    assert!(!env.members[k].data_dir().join("PG_VERSION").exists());
}

/// `SELECT count, min, max` of `t` as `count:min:max`.
async fn rows(m: &Member) -> String {
    m.sql("SELECT count(*)::text || ':' || min(id)::text || ':' || max(id)::text FROM t")
        .await
        .map(|r| r.concat())
        .unwrap_or_default()
}

/// The time on `m`'s clock, as a recovery target.
async fn now_on(m: &Member) -> String {
    m.sql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'",
    )
    .await
    .expect("time")[0]
        .clone()
}

/// The runbook of `docs/backup.md` ("a disaster-recovery drill") end to end, every step done
/// by the agents: a full backup, writes, a switchover, more writes; restores into new clusters
/// (own scope and stanza) to a time before the switchover and to one after it (on the new
/// timeline), with exact row counts; a replica created from the repository; a restore with a
/// target past the end of the WAL that fails cleanly, then the corrected retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disaster_recovery_drill_runs_without_a_manual_step() {
    let mut env = TestEnv::start(ClusterOptions {
        scope: "drill".into(),
        ..Default::default()
    })
    .await
    .expect("etcd");
    let repo = env.shared_dir("repo");
    for name in ["pg0", "pg1"] {
        let i = env.add_member(name);
        env.members[i].set("pgbackrest", section(&repo, "drill", ""));
    }
    env.start_member(0).expect("start pg0");
    wait_until("pg0 leads", T, || async {
        env.leader().await.as_deref() == Some("pg0")
    })
    .await;
    env.start_member(1).expect("start pg1");
    let (pg0, pg1) = (member(&env, "pg0"), member(&env, "pg1"));
    wait_stanza_checked(pg0).await;

    // 1. A full backup (the CLI waits for its end), then writes.
    ten_rows_and_a_full_backup(pg0).await;
    // pgBackRest records backup stop times in whole seconds: keep the targets clearly apart.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    pg0.sql("INSERT INTO t SELECT generate_series(11, 20)")
        .await
        .expect("rows 11-20");
    let before_switchover = now_on(pg0).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // 2. A switchover to pg1 (timeline 2), then more writes.
    wait_until("pg1 streams from pg0", T, || async {
        pg1.is_streaming_replica().await
    })
    .await;
    let (code, text) = pg0
        .api_request(
            "POST",
            "/switchover",
            Some(r#"{"leader": "pg0", "candidate": "pg1"}"#),
        )
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");
    wait_until("pg1 is a writable leader", T, || async {
        env.leader().await.as_deref() == Some("pg1")
            && pg1.sql("SELECT pg_is_in_recovery()::text").await.ok() == Some(vec!["false".into()])
    })
    .await;
    pg1.sql("INSERT INTO t SELECT generate_series(21, 30)")
        .await
        .expect("rows 21-30");
    let after_switchover = now_on(pg1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    pg1.sql("INSERT INTO t SELECT generate_series(31, 40)")
        .await
        .expect("rows 31-40");
    switch_and_wait_archived(pg1, &repo).await;
    let timeline = pg1
        .sql("SELECT timeline_id::text FROM pg_control_checkpoint()")
        .await
        .expect("timeline");
    assert_eq!(timeline, vec!["2"], "the switchover made timeline 2");
    // A day ahead: past the end of the WAL. (A target after 2038 is refused by pgBackRest
    // 2.45 before it restores anything, "unable to find backup set with stop time less
    // than …", so postgres' own end-of-WAL failure would not be exercised.)
    let past_the_end = pg1
        .sql(
            "SELECT to_char((clock_timestamp() + interval '1 day') AT TIME ZONE 'UTC', \
             'YYYY-MM-DD HH24:MI:SS') || '+00'",
        )
        .await
        .expect("time")[0]
        .clone();

    // 3. A replica created from the repository (it restores, then streams from pg1); it runs
    // while the restores below do.
    let k = env.add_member("pg2");
    env.members[k].set("pgbackrest", section(&repo, "drill", ""));
    env.members[k].set(
        "postgresql.create_replica_methods",
        yaml("[pgbackrest, basebackup]"),
    );
    env.start_member(k).expect("start pg2");

    // 4. Restores into new clusters, each with its own scope and stanza: to the time before
    // the switchover, and (first with a target past the end of the WAL) to the time after it.
    let bootstrap = |target: &str| {
        yaml(&format!(
            "stanza: drill\nrecovery_conf:\n  recovery_target_time: '{target}'\n  \
             recovery_target_timeline: latest\n  recovery_target_action: promote\n"
        ))
    };
    let mut restored = Vec::new();
    for (name, scope, target) in [
        ("r1", "drill-before", before_switchover.as_str()),
        ("r2", "drill-after", past_the_end.as_str()),
    ] {
        let j = env.add_member(name);
        let m = &mut env.members[j];
        m.set("scope", scope.into());
        m.set("pgbackrest", section(&repo, scope, ""));
        m.set("bootstrap.method", "pgbackrest".into());
        m.set("bootstrap.pgbackrest", bootstrap(target));
        env.start_member(j).expect("start a restore");
        restored.push(j);
    }
    let (r1, r2) = (restored[0], restored[1]);

    // 5. The target past the end of the WAL: the agent exits 1, leaving no data directory and
    // no keys behind.
    let exit = env.members[r2]
        .agent()
        .wait_exit(T)
        .expect("the failed bootstrap stops the agent");
    assert_eq!(exit.code(), Some(1), "{}", env.members[r2].log_tail(40));
    let log = env.members[r2].log_text();
    assert!(
        log.contains("recovery ended before configured recovery target was reached")
            && log.contains("so the next start restores afresh"),
        "{}",
        env.members[r2].log_tail(40)
    );
    assert!(
        std::fs::read_dir(env.members[r2].data_dir()).map_or(true, |mut d| d.next().is_none()),
        "the failed restore left files behind"
    );
    for key in ["initialize", "leader"] {
        assert_eq!(
            env.etcd
                .get(&format!("/service/drill-after/{key}"))
                .await
                .expect("etcd"),
            None,
            "`{key}` left behind by the failed bootstrap"
        );
    }
    // The corrected retry restores afresh.
    env.members[r2].set("bootstrap.pgbackrest", bootstrap(&after_switchover));
    env.start_member(r2).expect("retry the restore");

    // Exact rows: before the switchover 1-20 (timeline 1), after it 1-30 (timeline 2).
    for (j, expected, target) in [
        (r1, "20:1:20", &before_switchover),
        (r2, "30:1:30", &after_switchover),
    ] {
        let m = &env.members[j];
        wait_until(
            &format!("{} is a restored, running primary", m.name),
            T,
            || async {
                m.api_get("/primary").await.map(|r| r.0) == Some(200)
                    && m.sql("SELECT pg_is_in_recovery()::text").await.ok()
                        == Some(vec!["false".into()])
            },
        )
        .await;
        assert_eq!(
            rows(m).await,
            expected,
            "{}: exactly the rows before {target}",
            m.name
        );
    }
    let timeline = env.members[r2]
        .sql("SELECT timeline_id::text FROM pg_control_checkpoint()")
        .await
        .expect("timeline");
    assert_eq!(
        timeline,
        vec!["3"],
        "the restore after the switchover followed timeline 2 and promoted onto 3"
    );
    for j in [r1, r2] {
        env.members[j]
            .agent()
            .signal(nix::sys::signal::Signal::SIGTERM);
    }

    // 6. The replica restored from the repository streams from pg1 with every row.
    let pg2 = member(&env, "pg2");
    wait_until("pg2 streams from pg1 with every row", T, || async {
        pg2.is_streaming_replica().await && rows(pg2).await == "40:1:40"
    })
    .await;
    assert!(
        pg2.log_text()
            .lines()
            .any(|l| l.contains("replica created") && l.contains("pgbackrest")),
        "pg2 was not restored from the repository:\n{}",
        pg2.log_tail(40)
    );
    for j in [r1, r2] {
        env.members[j].agent().wait_exit(T).expect("stops");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_repository_is_reported_and_postgres_keeps_running() {
    let mut env = TestEnv::start(ClusterOptions {
        scope: "broken".into(),
        ..Default::default()
    })
    .await
    .expect("etcd");
    // The repository's parent is a regular file: the path can neither exist nor be created,
    // whichever user the agent runs as.
    let dir = env.shared_dir("shared");
    let blocker = dir.join("not-a-directory");
    std::fs::write(&blocker, "").expect("write");
    let repo: PathBuf = blocker.join("repo");
    let i = env.add_member("pg0");
    env.members[i].set("pgbackrest", section(&repo, "broken", ""));
    env.start_member(i).expect("start");
    env.wait_for_leader(T).await;
    let m = member(&env, "pg0");
    wait_until("the failed check is reported", T, || async {
        report(m).await["check"]["ok"] == Value::Bool(false)
    })
    .await;
    let r = report(m).await;
    let error = r["check"]["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("stanza-create"), "{error}");
    assert!(error.contains(&repo.display().to_string()), "{error}");
    let metrics = m.api_get("/metrics").await.expect("metrics").1;
    assert!(
        metrics.contains("pgwarden_backup_repo_ok{scope=\"broken\",name=\"pg0\"} 0"),
        "{metrics}"
    );
    // Postgres keeps running as a healthy primary and accepts writes.
    assert_eq!(m.api_get("/health").await.map(|r| r.0), Some(200));
    m.sql("CREATE TABLE still_writable (x int)")
        .await
        .expect("write");
    m.sql("SELECT pg_switch_wal()").await.expect("switch");
    wait_until("the archive failure is counted", T, || async {
        m.api_get("/metrics").await.is_some_and(|(_, text)| {
            text.lines().any(|l| {
                l.starts_with("pgwarden_wal_archive_failed_count{")
                    && !l.ends_with(" 0")
                    && !l.ends_with(" 0.0")
            })
        })
    })
    .await;
    // An on-demand backup is accepted, fails, and is reported; nothing crashes.
    // (503 while the periodic stanza-create retry runs.)
    wait_until("an on-demand backup is accepted", T, || async {
        m.api_request("POST", "/backup", Some("{\"type\": \"full\"}"))
            .await
            .is_some_and(|(code, _)| code == 202)
    })
    .await;
    wait_until("the failed backup is reported", T, || async {
        report(m).await["last"]["ok"] == Value::Bool(false)
    })
    .await;
    assert_eq!(m.api_get("/health").await.map(|r| r.0), Some(200));
    let (code, body) = m
        .api_request("POST", "/backup", Some("{\"type\": \"weekly\"}"))
        .await
        .expect("answers");
    assert_eq!(code, 400, "{body}");
}

#[test]
fn invalid_pgbackrest_settings_are_refused_with_the_field_and_exit_code_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yml");
    std::fs::write(
        &path,
        "scope: s\nname: n\nrestapi: {listen: '127.0.0.1:8008'}\netcd3: {hosts: ['127.0.0.1:2379']}\n\
         postgresql:\n  listen: 127.0.0.1:5432\n  data_dir: /tmp/x/data\n  \
         authentication: {superuser: {username: postgres}, replication: {username: r}}\n\
         pgbackrest:\n  repos: [{type: posix}, {path: /r2, schedule: {diff: 'nightly'}}]\n  \
         schedule: {full: 'at midnight'}\n",
    )
    .expect("write");
    let out = std::process::Command::new(pgwarden_tests::harness::agent_binary())
        .arg("validate-config")
        .arg(&path)
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("pgbackrest.repos[0].path"), "{stderr}");
    assert!(stderr.contains("pgbackrest.schedule.full"), "{stderr}");
    assert!(
        stderr.contains("pgbackrest.repos[1].schedule.diff"),
        "{stderr}"
    );
}

/// The types of the backups `pgbackrest info --repo=<n>` lists in repository `n` of the
/// stanza, whose repositories are at `repos` (repo1 first), oldest first.
fn backup_types_in(repos: &[&Path], stanza: &str, n: usize) -> Vec<String> {
    let mut cmd = std::process::Command::new("pgbackrest");
    cmd.arg(format!("--stanza={stanza}"))
        .arg("--log-level-file=off")
        .arg("--log-level-console=off");
    for (i, repo) in repos.iter().enumerate() {
        cmd.arg(format!("--repo{}-path={}", i + 1, repo.display()));
    }
    let out = cmd
        .arg(format!("--repo={n}"))
        .arg("--output=json")
        .arg("info")
        .output()
        .expect("pgbackrest info runs");
    assert!(
        out.status.success(),
        "pgbackrest info --repo={n}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).expect("pgbackrest info JSON");
    info.as_array()
        .into_iter()
        .flatten()
        .flat_map(|stanza| stanza["backup"].as_array().cloned().unwrap_or_default())
        // `--repo` already filters; the key proves each backup is in repository n.
        .filter(|b| b["database"]["repo-key"].as_u64() == Some(n as u64))
        .filter_map(|b| b["type"].as_str().map(str::to_owned))
        .collect()
}

/// Two posix repositories with the same full-backup schedule, repo1's in the old
/// `pgbackrest.schedule` form and repo2's in `repos[1].schedule`: the leader backs up into
/// each (one repository's run does not stand for the other's fire), an on-demand backup
/// through `POST /backup` and one through `pgwarden backup --repo 2` land in repo2 only, and an
/// unknown repository is refused with 400. What is in each repository is read from
/// `pgbackrest info --repo=<n>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_repository_has_its_own_scheduled_backups_and_on_demand_ones_name_theirs() {
    let mut env = TestEnv::start(ClusterOptions {
        scope: "tworepos".into(),
        ..Default::default()
    })
    .await
    .expect("etcd");
    let repo1 = env.shared_dir("repo1");
    let repo2 = env.shared_dir("repo2");
    let i = env.add_member("pg0");
    env.members[i].set(
        "pgbackrest",
        yaml(&format!(
            "stanza: tworepos\nrepos:\n  - {{type: posix, path: {}, retention_full: 2}}\n  \
             - {{type: posix, path: {}, retention_full: 2, \
             schedule: {{full: '*/30 * * * * *'}}}}\n\
             schedule: {{full: '*/30 * * * * *'}}\ncompress_type: lz4\nprocess_max: 1\n\
             timeout: 300\noptions:\n  archive-timeout: 30\n",
            repo1.display(),
            repo2.display()
        )),
    );
    env.start_member(i).expect("start");
    env.wait_for_leader(T).await;
    let m = member(&env, "pg0");
    wait_stanza_checked(m).await;
    let repos = [repo1.as_path(), repo2.as_path()];

    // Both repositories' fires come at the same instants: each gets its own full backup.
    wait_until("a scheduled full backup in each repository", T, || async {
        backup_types_in(&repos, "tworepos", 1).contains(&"full".to_owned())
            && backup_types_in(&repos, "tworepos", 2).contains(&"full".to_owned())
    })
    .await;
    let fires = m.log_text();
    for n in [1, 2] {
        assert!(
            fires
                .lines()
                .any(|l| l.contains("starting the scheduled backup")
                    && l.contains(&format!("repo={n}"))),
            "no scheduled backup into repo{n} in the log"
        );
    }

    // On demand into repo2 (a scheduled backup may be running: 409, asked again).
    let answer = std::sync::Mutex::new(Value::Null);
    wait_until(
        "an incremental backup into repo2 is accepted",
        T,
        || async {
            match m
                .api_request("POST", "/backup", Some(r#"{"type": "incr", "repo": 2}"#))
                .await
            {
                Some((202, body)) => {
                    *answer.lock().expect("lock") =
                        serde_json::from_str(&body).unwrap_or(Value::Null);
                    true
                }
                _ => false,
            }
        },
    )
    .await;
    let accepted = answer.lock().expect("lock").clone();
    assert_eq!(accepted["repo"], 2, "{accepted}");
    assert_eq!(accepted["type"], "incr", "{accepted}");
    wait_until("the incremental backup is in repo2", T, || async {
        backup_types_in(&repos, "tworepos", 2).contains(&"incr".to_owned())
    })
    .await;

    // The CLI names the repository too; it waits for the backup's end.
    wait_until("pgwarden backup --repo 2 succeeds", T, || async {
        cli(m, &["backup", "--type", "diff", "--repo", "2"])
            .status
            .success()
    })
    .await;
    assert!(
        backup_types_in(&repos, "tworepos", 2).contains(&"diff".to_owned()),
        "{:?}",
        backup_types_in(&repos, "tworepos", 2)
    );
    // repo1 only ever got its scheduled full backups.
    let in_repo1 = backup_types_in(&repos, "tworepos", 1);
    assert!(in_repo1.iter().all(|t| t == "full"), "{in_repo1:?}");

    let (code, body) = m
        .api_request("POST", "/backup", Some(r#"{"type": "full", "repo": 3}"#))
        .await
        .expect("answers");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not a configured repository"), "{body}");
}

/// An S3 repository (moto behind TLS, see the harness): the stanza is created in the bucket,
/// WAL is archived there, an on-demand backup lands there, and a new replica is restored from
/// it rather than cloned from the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_repository_archives_backs_up_and_restores_a_replica() {
    let mut env = TestEnv::start(ClusterOptions {
        scope: "s3".into(),
        ..Default::default()
    })
    .await
    .expect("etcd");
    let s3 = S3Server::start(&env.shared_dir("s3"))
        .await
        .expect("the S3 test server starts");
    s3.create_bucket("pgwarden").await.expect("bucket");
    let pgbackrest = yaml(&format!(
        "stanza: main\nrepos:\n  - type: s3\n    path: /cluster\n    retention_full: 2\n    \
         s3_bucket: pgwarden\n    s3_endpoint: '127.0.0.1:{}'\n    s3_region: us-east-1\n    \
         s3_key: test-key\n    s3_key_secret: test-secret\n    s3_uri_style: path\n    \
         s3_verify_tls: false\ncompress_type: lz4\nprocess_max: 1\ntimeout: 300\n\
         options:\n  archive-timeout: 30\n",
        s3.tls_port
    ));
    for name in ["pg0", "pg1"] {
        let i = env.add_member(name);
        env.members[i].set("pgbackrest", pgbackrest.clone());
        env.members[i].set(
            "postgresql.create_replica_methods",
            yaml("[pgbackrest, basebackup]"),
        );
    }
    env.start_member(0).expect("start");
    let leader = env.wait_for_leader(T).await;
    let m = member(&env, &leader);
    wait_stanza_checked(m).await;
    let file = m
        .sql("SELECT pg_walfile_name(pg_switch_wal())")
        .await
        .expect("switch WAL")[0]
        .clone();
    wait_until(&format!("{file} is in the bucket"), T, || async {
        s3.list("pgwarden", "cluster/archive/main/")
            .await
            .iter()
            .any(|k| k.contains(&file))
    })
    .await;
    wait_until("an on-demand backup is accepted", T, || async {
        m.api_request("POST", "/backup", Some("{\"type\": \"full\"}"))
            .await
            .is_some_and(|(code, _)| code == 202)
    })
    .await;
    wait_until("the backup succeeded", T, || async {
        report(m).await["last"]["ok"] == Value::Bool(true)
    })
    .await;
    let keys = s3.list("pgwarden", "cluster/backup/main/").await;
    assert!(
        keys.iter().any(|k| k.ends_with("backup.manifest")),
        "no backup manifest in the bucket: {keys:?}"
    );
    let info = m.api_get("/backups").await.expect("/backups answers");
    assert_eq!(info.0, 200, "{}", info.1);
    let info: Value = serde_json::from_str(&info.1).expect("JSON");
    assert_eq!(
        info[0]["backup"].as_array().map(Vec::len),
        Some(1),
        "{info}"
    );

    // A new member is restored from the bucket, not cloned from the primary.
    env.start_member(1).expect("start pg1");
    let replica = member(&env, "pg1");
    wait_until("pg1 streams", T, || async {
        replica.is_streaming_replica().await
    })
    .await;
    let log = replica.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("replica created") && l.contains("pgbackrest")),
        "pg1 was not restored by pgbackrest:\n{}",
        replica.log_tail(60)
    );
}

/// Backups from a standby (`backup_standby`, pgBackRest's `backup-standby=y`): every member
/// runs pgBackRest's TLS server under its agent and publishes it; the leader picks a streaming
/// replica, runs the backup with that replica as `pg2-host`, and pgBackRest copies the files
/// from it. A replica asked for a backup answers 421 with the leader's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_from_a_standby_copies_the_files_from_the_chosen_replica() {
    let mut env = TestEnv::start(ClusterOptions {
        scope: "bstandby".into(),
        ..Default::default()
    })
    .await
    .expect("etcd");
    let repo = env.shared_dir("repo");
    let tls_dir = env.shared_dir("tls");
    // One certificate for all members, its own CA: server certificate (pgBackRest 2.45 checks
    // the host name against DNS names only, hence `localhost`) and the leader's client
    // certificate (its CN is what `tls-server-auth` admits).
    let (cert, key) = pgwarden_tests::harness::tls::self_signed(
        &tls_dir,
        "pgbackrest",
        "pgwarden-backup",
        "DNS:localhost,IP:127.0.0.1",
    )
    .expect("certificate");
    env.shared_dir("tls"); // hand the new files to the agents' user
    for name in ["pg0", "pg1", "pg2"] {
        let i = env.add_member(name);
        let port = pgwarden_tests::harness::ports::free_port();
        env.members[i].set(
            "pgbackrest",
            section(
                &repo,
                "main",
                &format!(
                    "backup_standby: true\ntls_server:\n  address: 127.0.0.1\n  \
                     connect_address: localhost\n  port: {port}\n  cert_file: {c}\n  \
                     key_file: {k}\n  ca_file: {c}\n  client_cn: pgwarden-backup\n",
                    c = cert.display(),
                    k = key.display()
                ),
            ),
        );
    }
    for i in 0..3 {
        env.start_member(i).expect("start");
    }
    let leader = env.wait_for_leader(T).await;
    let l = member(&env, &leader);
    wait_stanza_checked(l).await;
    for m in env.members.iter().filter(|m| m.name != leader) {
        wait_until(&format!("{} streams", m.name), T, || async {
            m.is_streaming_replica().await
        })
        .await;
    }

    // A replica sends the client to the leader.
    let replica = env
        .members
        .iter()
        .find(|m| m.name != leader)
        .expect("a replica");
    let (code, body) = replica
        .api_request("POST", "/backup", Some("{\"type\": \"full\"}"))
        .await
        .expect("answers");
    assert_eq!(code, 421, "{body}");
    let body: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["leader"], leader.as_str(), "{body}");
    assert!(
        body["api_url"]
            .as_str()
            .is_some_and(|u| u.contains(&l.api_port.to_string())),
        "{body}"
    );

    // The leader runs it from a replica (503 until the replicas' records show their servers).
    let deadline = std::time::Instant::now() + T;
    let accepted: Value = loop {
        match l
            .api_request("POST", "/backup", Some("{\"type\": \"full\"}"))
            .await
        {
            Some((202, body)) => break serde_json::from_str(&body).expect("JSON"),
            other => assert!(
                std::time::Instant::now() < deadline,
                "the leader never accepted a backup from a standby: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let standby = accepted["standby"]
        .as_str()
        .unwrap_or_else(|| panic!("no standby named in {accepted}"))
        .to_owned();
    assert_ne!(standby, leader);
    wait_until("the backup from the standby succeeded", T, || async {
        let r = report(l).await;
        r["running"].is_null() && r["last"]["ok"] == Value::Bool(true)
    })
    .await;
    let r = report(l).await;
    assert_eq!(r["last"]["standby"], standby.as_str(), "{r}");

    // `pgbackrest info` lists it, and pgBackRest recorded that it was taken from a standby.
    let info = l.api_get("/backups").await.expect("/backups answers");
    assert_eq!(info.0, 200, "{}", info.1);
    let info: Value = serde_json::from_str(&info.1).expect("JSON");
    let backups = info[0]["backup"].as_array().cloned().unwrap_or_default();
    assert_eq!(backups.len(), 1, "{info}");
    let label = backups[0]["label"].as_str().expect("label").to_owned();
    let manifest = std::fs::read_to_string(
        repo.join("backup/main")
            .join(&label)
            .join("backup.manifest"),
    )
    .expect("the backup's manifest");
    assert!(
        manifest
            .lines()
            .any(|line| line == "option-backup-standby=true"),
        "the manifest of {label} does not say backup-standby:\n{}",
        manifest
            .lines()
            .filter(|l| l.starts_with("option-"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // pgBackRest waited for the standby to replay to the backup's start: it did talk to it.
    let log = l.log_text();
    assert!(
        log.lines()
            .any(|line| line.contains("replay on the standby reached")),
        "no standby replay wait in the leader's log:\n{}",
        l.log_tail(80)
    );
    assert!(
        log.lines()
            .any(|line| line.contains("backing up from the standby") && line.contains(&standby)),
        "{}",
        l.log_tail(80)
    );
}

/// Patroni's standby cluster from an archive (`replica_bootstrap.rst`, "Standby cluster"):
/// no connection to the source at all. The first member restores the source's latest backup
/// from the source's pgBackRest repository with Patroni's usual custom method
/// (`postgresql.pgbackrest.command`, `no_master`), holds the lock as the standby leader and
/// replays the source's WAL with `standby_cluster.restore_command` (`archive-get` from the
/// source's stanza); a second member cascades from it; removing `standby_cluster` promotes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_cluster_restored_from_the_sources_repository_replays_its_archive() {
    let (mut env, repo) = archiving_cluster_of_one("source", "s0").await;
    let s = member(&env, "s0");
    ten_rows_and_a_full_backup(s).await;

    let pgbackrest = format!(
        "pgbackrest --stanza=source --repo1-path={} --log-level-file=off",
        repo.display()
    );
    let mut dr = Vec::new();
    for name in ["d0", "d1"] {
        let j = env.add_member(name);
        let data = env.members[j].data_dir();
        let d = &mut env.members[j];
        d.set("scope", "dr".into());
        if name == "d0" {
            let mut method = serde_yaml::Mapping::new();
            method.insert(
                "command".into(),
                format!("{pgbackrest} --pg1-path={} --delta restore", data.display()).into(),
            );
            for flag in ["keep_data", "no_params", "no_master"] {
                method.insert(flag.into(), true.into());
            }
            d.set("postgresql.pgbackrest", serde_yaml::Value::Mapping(method));
        }
        let mut standby = serde_yaml::Mapping::new();
        standby.insert(
            "create_replica_methods".into(),
            serde_yaml::Value::Sequence(vec!["pgbackrest".into()]),
        );
        standby.insert(
            "restore_command".into(),
            // Run by postgres through the shell in its data directory (each member's own).
            format!("{pgbackrest} --pg1-path=\"$PWD\" archive-get %f \"%p\"").into(),
        );
        d.set(
            "bootstrap.dcs.standby_cluster",
            serde_yaml::Value::Mapping(standby),
        );
        dr.push(j);
    }
    let (d0, d1) = (dr[0], dr[1]);
    env.start_member(d0).expect("start d0");
    wait_until("d0 is the standby leader with the backup's rows", T, || {
        let (etcd, m) = (&env.etcd, &env.members[d0]);
        async move {
            etcd.get("/service/dr/leader")
                .await
                .ok()
                .flatten()
                .as_deref()
                == Some("d0")
                && m.api_get("/standby-leader").await.map(|(c, _)| c) == Some(200)
                && m.sql("SELECT count(*)::text FROM t").await.ok() == Some(vec!["10".to_owned()])
        }
    })
    .await;
    let standby = &env.members[d0];
    assert!(
        standby.streaming_from().await.is_none(),
        "d0 replays from the archive only"
    );
    assert!(
        standby
            .log_text()
            .contains("creating the replica with a custom method"),
        "d0 was restored by the pgbackrest method"
    );
    assert!(
        standby.sql("INSERT INTO t VALUES (100)").await.is_err(),
        "the standby leader refused a write"
    );

    // New rows on the source reach the standby cluster through the archive alone.
    let s = member(&env, "s0");
    s.sql("INSERT INTO t SELECT generate_series(11, 20)")
        .await
        .expect("more rows");
    switch_and_wait_archived(s, &repo).await;
    wait_until("d0 replayed the archived rows", T, || async {
        env.members[d0]
            .sql("SELECT count(*)::text FROM t")
            .await
            .ok()
            == Some(vec!["20".to_owned()])
    })
    .await;

    env.start_member(d1).expect("start d1");
    let d0_port = env.members[d0].pg_port;
    wait_until("d1 cascades from d0 with every row", T, || {
        let m = &env.members[d1];
        async move {
            m.streaming_from().await.map(|(port, _)| port) == Some(d0_port)
                && m.sql("SELECT count(*)::text FROM t").await.ok() == Some(vec!["20".to_owned()])
        }
    })
    .await;

    // Promotion: the standby leader becomes an ordinary primary; d1 keeps streaming from it.
    let (code, text) = env.members[d0]
        .api_request("PATCH", "/config", Some(r#"{"standby_cluster": null}"#))
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");
    wait_until("d0 accepts writes after the promotion", T, || async {
        env.members[d0]
            .sql("INSERT INTO t VALUES (21)")
            .await
            .is_ok()
    })
    .await;
    wait_until("d1 replicates the promoted leader's write", T, || async {
        env.members[d1]
            .sql("SELECT count(*)::text FROM t")
            .await
            .ok()
            == Some(vec!["21".to_owned()])
    })
    .await;
}
