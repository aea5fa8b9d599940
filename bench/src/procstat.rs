//! Memory and CPU of an agent's processes (the agent and its helpers, not postgres), from /proc.
//!
//! CPU is the scheduler's run time in nanoseconds (`/proc/<pid>/task/<tid>/schedstat`, first
//! field), summed over every thread. `utime + stime` from `/proc/<pid>/stat` counts 10 ms clock
//! ticks, too coarse for an idle agent: 60 s of pgwarden were 3 or 4 ticks. A thread that exits
//! during the window takes its run time with it, so the window is taken over the threads that
//! exist at its end; both agents keep their threads (tokio workers, Python's threads) alive.

use std::time::Duration;

/// Memory and CPU of one process tree at an instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// Run time of all threads, nanoseconds.
    pub cpu_ns: u64,
}

fn status_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Command name and parent PID.
fn stat(pid: i32) -> Option<(String, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let fields: Vec<&str> = text[close + 2..].split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    Some((comm, ppid))
}

/// The agent process and its descendants, except postgres and its children.
pub fn agent_tree(root: i32) -> Vec<i32> {
    let mut all: Vec<(i32, String, i32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                if let Some((comm, ppid)) = stat(pid) {
                    all.push((pid, comm, ppid));
                }
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        for (pid, comm, ppid) in &all {
            if *ppid == parent && comm != "postgres" && !tree.contains(pid) {
                tree.push(*pid);
            }
        }
        i += 1;
    }
    tree
}

/// Sums memory and CPU over the agent's processes.
pub fn sample(root: i32) -> Sample {
    let mut s = Sample::default();
    for pid in agent_tree(root) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        s.rss_kib += status_field(&status, "VmRSS:");
        s.hwm_kib += status_field(&status, "VmHWM:");
        s.cpu_ns += run_time_ns(pid);
    }
    s
}

/// Sum of the run time of every thread of `pid`, nanoseconds.
fn run_time_ns(pid: i32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// CPU seconds used by the tree over `window`.
pub async fn idle_cpu(root: i32, window: Duration) -> (f64, Sample) {
    let before = sample(root);
    tokio::time::sleep(window).await;
    let after = sample(root);
    (
        after.cpu_ns.saturating_sub(before.cpu_ns) as f64 / 1e9,
        after,
    )
}
