//! Failure scenarios on the leader, run alike on both agents: what is killed or frozen, and
//! the timing profiles (ttl, loop_wait, retry_timeout) they run at.

use std::path::Path;

use nix::sys::signal::Signal;
use pgwarden_tests::harness::process::{children_of, running_in};
use pgwarden_tests::harness::Member;

/// ttl, loop_wait and retry_timeout of one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    pub name: &'static str,
    pub ttl: u32,
    pub loop_wait: u32,
    pub retry_timeout: u32,
}

/// The benchmark's usual settings.
pub const FAST: Profile = Profile {
    name: "fast",
    ttl: 10,
    loop_wait: 2,
    retry_timeout: 3,
};

/// Patroni's defaults.
pub const DEFAULTS: Profile = Profile {
    name: "defaults",
    ttl: 30,
    loop_wait: 10,
    retry_timeout: 10,
};

impl Profile {
    pub fn label(&self) -> String {
        format!(
            "{}: ttl {}, loop_wait {}",
            self.name, self.ttl, self.loop_wait
        )
    }
}

/// What happens to the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 of the agent process alone. pgwarden's postgres goes by its parent-death signal
    /// and the fence guard releases the leader key; Patroni's postgres keeps running.
    AgentCrash,
    /// kill -9 of every process of the member at once (agent, fence guard, postgres and its
    /// backends): nothing is left to release the leader key, its lease must run out.
    HostLoss,
    /// SIGSTOP of every process of the member; SIGCONT once another member leads.
    HostFreeze,
    /// kill -9 of the postmaster alone, the agent alive, with this `primary_start_timeout`.
    PostgresCrash { primary_start_timeout: u32 },
}

impl Fault {
    pub fn name(&self) -> String {
        match self {
            Fault::AgentCrash => "agent crash".into(),
            Fault::HostLoss => "host loss".into(),
            Fault::HostFreeze => "host freeze".into(),
            Fault::PostgresCrash {
                primary_start_timeout,
            } => format!("postgres crash, primary_start_timeout {primary_start_timeout}"),
        }
    }

    /// The failover waits for the leader's lease to run out, whatever the agent (too long for
    /// `--quick`).
    pub fn waits_for_lease(&self) -> bool {
        matches!(self, Fault::HostLoss | Fault::HostFreeze)
    }

    /// The selection names of `--faults`.
    pub fn parse(name: &str) -> anyhow::Result<Vec<Fault>> {
        Ok(match name {
            "agent-crash" => vec![Fault::AgentCrash],
            "host-loss" => vec![Fault::HostLoss],
            "host-freeze" => vec![Fault::HostFreeze],
            "postgres-crash" => vec![
                Fault::PostgresCrash {
                    primary_start_timeout: 300,
                },
                Fault::PostgresCrash {
                    primary_start_timeout: 0,
                },
            ],
            "all" => vec![
                Fault::AgentCrash,
                Fault::HostLoss,
                Fault::HostFreeze,
                Fault::PostgresCrash {
                    primary_start_timeout: 300,
                },
                Fault::PostgresCrash {
                    primary_start_timeout: 0,
                },
            ],
            other => anyhow::bail!(
                "unknown fault {other:?}; known: all, agent-crash, host-loss, host-freeze, \
                 postgres-crash"
            ),
        })
    }
}

/// Every process of a member: the agent, its children (pgwarden's fence guard and postmaster,
/// Patroni's postmaster) and every process running in the data directory (postgres and its
/// backends, also a postmaster that outlived its agent).
pub fn member_pids(m: &Member) -> Vec<i32> {
    let mut pids = Vec::new();
    if let Some(agent) = m.process.as_ref().map(|p| p.pid()) {
        pids.push(agent);
        pids.extend(children_of(agent));
    }
    add_running_in(&mut pids, &m.data_dir());
    pids
}

fn add_running_in(pids: &mut Vec<i32>, dir: &Path) {
    for pid in running_in(dir) {
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    }
}

/// SIGSTOP of every process of the member; returns them for [`thaw`]. A second pass stops
/// whatever the postmaster forked between the listing and its own stop.
pub fn freeze(m: &Member) -> Vec<i32> {
    let mut pids = member_pids(m);
    signal_all(&pids, Signal::SIGSTOP);
    let before = pids.len();
    add_running_in(&mut pids, &m.data_dir());
    signal_all(&pids[before..], Signal::SIGSTOP);
    pids
}

pub fn thaw(pids: &[i32]) {
    signal_all(pids, Signal::SIGCONT);
}

fn signal_all(pids: &[i32], signal: Signal) {
    for pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), signal);
    }
}
