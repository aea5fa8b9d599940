//! Memory and CPU of an agent's processes (the agent and its helpers, not postgres), from /proc.

use std::time::Duration;

/// Memory and CPU of one process tree at an instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub cpu_ticks: u64,
}

fn status_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn stat(pid: i32) -> Option<(String, i32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let fields: Vec<&str> = text[close + 2..].split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, ppid, utime + stime))
}

/// The agent process and its descendants, except postgres and its children.
pub fn agent_tree(root: i32) -> Vec<i32> {
    let mut all: Vec<(i32, String, i32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                if let Some((comm, ppid, _)) = stat(pid) {
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
        s.cpu_ticks += stat(pid).map(|(_, _, t)| t).unwrap_or(0);
    }
    s
}

/// Clock ticks per second for converting CPU ticks.
pub fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|t| t as f64)
        .unwrap_or(100.0)
}

/// CPU seconds used by the tree over `window`.
pub async fn idle_cpu(root: i32, window: Duration) -> (f64, Sample) {
    let before = sample(root);
    tokio::time::sleep(window).await;
    let after = sample(root);
    (
        after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / ticks_per_second(),
        after,
    )
}
