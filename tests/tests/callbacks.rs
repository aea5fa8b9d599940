//! `postgresql.callbacks` on a real 2-member cluster, as Patroni 4.1 calls them
//! (`patroni/postgresql/callback_executor.py`, `Postgresql.call_nowait`): the command gets
//! `action role scope`, runs without being waited for, and a callback still running when the
//! next one starts is killed with its children.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pgwarden_tests::harness::{wait_until, ClusterOptions, TestEnv};
use serde_yaml::Value;

const T: Duration = Duration::from_secs(90);

/// Appends its arguments after the first (the output file) to that file. While the file
/// `slow` exists beside it, `on_role_change` records its process id, sleeps 30 s and then
/// writes `finished`, which a callback killed in time never does.
const SCRIPT: &str = r#"#!/bin/sh
out=$1
shift
echo "$*" >> "$out"
if [ -e "$(dirname "$out")/slow" ] && [ "$1" = on_role_change ]; then
    echo $$ > "$out.slow.pid"
    sleep 30
    echo "$* finished" >> "$out"
fi
"#;

fn callbacks(script: &Path, out: &Path) -> Value {
    let command = Value::String(format!("/bin/sh {} {}", script.display(), out.display()));
    let mut map = serde_yaml::Mapping::new();
    for key in [
        "on_start",
        "on_stop",
        "on_restart",
        "on_reload",
        "on_role_change",
    ] {
        map.insert(Value::String(key.into()), command.clone());
    }
    Value::Mapping(map)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn wait_line(path: &Path, line: &str) {
    wait_until(&format!("{line:?} in {}", path.display()), T, || async {
        lines(path).iter().any(|l| l == line)
    })
    .await;
}

fn group_alive(pid: i32) -> bool {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

async fn slow_pid(out: &Path) -> i32 {
    let file = PathBuf::from(format!("{}.slow.pid", out.display()));
    wait_until(&format!("{} is written", file.display()), T, || async {
        std::fs::read_to_string(&file)
            .ok()
            .is_some_and(|s| s.trim().parse::<i32>().is_ok())
    })
    .await;
    let pid = std::fs::read_to_string(&file).expect("pid file");
    std::fs::remove_file(&file).expect("remove the pid file");
    pid.trim().parse().expect("a pid")
}

async fn switchover(env: &TestEnv, leader: usize, candidate: usize) -> Duration {
    let body = format!(
        r#"{{"leader": "{}", "candidate": "{}"}}"#,
        env.members[leader].name, env.members[candidate].name
    );
    let began = Instant::now();
    let (code, text) = env.members[leader]
        .api_request("POST", "/switchover", Some(&body))
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");
    let old = &env.members[leader];
    wait_until(&format!("{} streams as a replica", old.name), T, || async {
        old.api_get("/replica").await.map(|(s, _)| s) == Some(200)
            && old.is_streaming_replica().await
    })
    .await;
    began.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_get_action_role_scope_and_never_hold_up_a_switchover() {
    let mut env = TestEnv::start(ClusterOptions::default())
        .await
        .expect("etcd");
    let scope = env.options.scope.clone();
    let shared = env.shared_dir("callbacks");
    let script = shared.join("callback.sh");
    std::fs::write(&script, SCRIPT).expect("write the script");
    let out: Vec<PathBuf> = ["pg0", "pg1"]
        .iter()
        .map(|n| shared.join(format!("{n}.log")))
        .collect();
    for (i, name) in ["pg0", "pg1"].iter().enumerate() {
        env.add_member(name);
        env.members[i].set("postgresql.callbacks", callbacks(&script, &out[i]));
    }
    env.start_member(0).expect("start pg0");
    assert_eq!(env.wait_for_leader(T).await, "pg0");
    env.start_member(1).expect("start pg1");
    wait_until("pg1 streams", T, || async {
        env.members[1].is_streaming_replica().await
    })
    .await;

    // on_start after postgres accepts connections, with the role it runs in.
    wait_line(&out[0], &format!("on_start primary {scope}")).await;
    wait_line(&out[1], &format!("on_start replica {scope}")).await;
    for m in &env.members {
        let log = m.log_text();
        assert!(
            !log.contains("unknown configuration key `postgresql.callbacks"),
            "{}",
            m.log_tail(30)
        );
    }

    // POST /reload with a changed parameter: postgres is reloaded, then on_reload runs, and
    // the callbacks are those of the re-read file (they now write elsewhere).
    let reloaded = shared.join("pg0.reloaded.log");
    env.members[0].set("postgresql.callbacks", callbacks(&script, &reloaded));
    env.members[0].set(
        "postgresql.parameters.work_mem",
        Value::String("8MB".into()),
    );
    env.members[0].write_config().expect("rewrite pg0's config");
    let (code, text) = env.members[0]
        .api_request("POST", "/reload", None)
        .await
        .expect("answers");
    assert_eq!(code, 202, "{text}");
    wait_line(&reloaded, &format!("on_reload primary {scope}")).await;
    assert!(!lines(&out[0]).iter().any(|l| l.starts_with("on_reload")));
    let out = vec![reloaded, out[1].clone()];

    // A switchover while every on_role_change sleeps 30 s: not held up by them.
    std::fs::write(shared.join("slow"), "").expect("slow marker");
    let took = switchover(&env, 0, 1).await;
    assert_eq!(env.leader().await.as_deref(), Some("pg1"));
    assert!(
        took < Duration::from_secs(25),
        "the switchover took {took:?}: it waited for a callback"
    );
    // The former primary: stopped as `demoted`, then back as a replica (a role change, not
    // a start); the new one: promoted.
    wait_line(&out[0], &format!("on_stop demoted {scope}")).await;
    wait_line(&out[0], &format!("on_role_change replica {scope}")).await;
    wait_line(&out[1], &format!("on_role_change primary {scope}")).await;
    let old_slow = slow_pid(&out[0]).await;
    let new_slow = slow_pid(&out[1]).await;
    assert!(group_alive(old_slow) && group_alive(new_slow));
    assert!(!lines(&out[0]).contains(&format!("on_start replica {scope}")));

    // Back again, quick callbacks now: the next callback on each member kills the sleeping
    // one with its `sleep`.
    std::fs::remove_file(shared.join("slow")).expect("remove the marker");
    switchover(&env, 1, 0).await;
    wait_line(&out[0], &format!("on_role_change primary {scope}")).await;
    wait_line(&out[1], &format!("on_stop demoted {scope}")).await;
    wait_line(&out[1], &format!("on_role_change replica {scope}")).await;
    wait_until("the slow callbacks are killed", T, || async {
        !group_alive(old_slow) && !group_alive(new_slow)
    })
    .await;

    // A restart of the replica: on_restart, neither on_stop nor on_start.
    let before = lines(&out[1]).len();
    let (code, text) = env.members[1]
        .api_request("POST", "/restart", Some("{}"))
        .await
        .expect("answers");
    assert_eq!(code, 200, "{text}");
    wait_line(&out[1], &format!("on_restart replica {scope}")).await;
    let after: Vec<String> = lines(&out[1])[before..]
        .iter()
        .filter(|l| !l.starts_with("on_reload"))
        .cloned()
        .collect();
    assert_eq!(after, [format!("on_restart replica {scope}")]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for path in &out {
        // One promotion each, one callback each (the loop may ask twice while it promotes).
        let promoted = format!("on_role_change primary {scope}");
        assert_eq!(
            lines(path).iter().filter(|l| **l == promoted).count(),
            1,
            "{:?}",
            lines(path)
        );
        assert!(
            !lines(path).iter().any(|l| l.ends_with("finished")),
            "a killed callback finished: {:?}",
            lines(path)
        );
    }
}
