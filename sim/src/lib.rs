//! Deterministic simulation of pgwarden clusters (issue 9).
//!
//! N members run the agent's real HA loop ([`pgwarden::ha::HaLoop`]: observation, the pure
//! decision, the executor, the sync planner and the fence arithmetic) over simulated ports: a
//! simulated DCS, simulated postgres instances, a simulated network and per-member clocks. One seed fixes everything: the cluster's
//! settings, the fault schedule, every latency and every replication delay, so a failing seed
//! replays exactly (`cargo run -p pgwarden-sim -- --seed N --members M --trace`).
//!
//! # Layout
//! - [`world`]: the DCS store (leases with a TTL, revisions, compare-and-set, watches),
//!   postgres (WAL as entry lists, replication with lag, synchronous commit, promote, stop,
//!   crash), clocks with bounded drift, the network (partitions, DCS cuts).
//! - [`agent`]: the ports ([`pgwarden::ha::ports`]) one member's real HA loop runs with, so
//!   that every request takes simulated time; dropping the loop is kill -9, not polling it is
//!   SIGSTOP.
//! - [`guard`]: the fence guard of a killed agent, which releases its lease once postgres is
//!   gone (the proof-of-death release), and the lock a restarted agent waits on.
//! - [`sim`]: the seeded schedule (settings and faults), the scheduler, and the invariants
//!   checked after every step.
//!
//! See `docs/simulation.md` for the model, the invariants and how to run a campaign.

pub mod agent;
pub mod guard;
pub mod sim;
pub mod world;

pub use sim::{
    run, run_schedule, run_with, schedule, schedule_with, Fault, Report, Schedule, Violation,
};

/// Runs `count` schedules from `first` on (seeds `first`, `first + 1`, …), alternating 3 and 5
/// members unless `members` is given; returns the first violation.
pub fn campaign(
    first: u64,
    count: u64,
    members: Option<usize>,
) -> Result<CampaignReport, Violation> {
    campaign_with(first, count, members, true)
}

/// [`campaign`], failsafe mode allowed or not (`sim::schedule_with`).
pub fn campaign_with(
    first: u64,
    count: u64,
    members: Option<usize>,
    failsafe: bool,
) -> Result<CampaignReport, Violation> {
    let mut report = CampaignReport::default();
    for seed in first..first.saturating_add(count) {
        let m = members.unwrap_or(if seed % 2 == 0 { 3 } else { 5 });
        let (result, _) = sim::run_with(seed, Some(m), false, failsafe);
        report.add(&result?);
    }
    Ok(report)
}

/// Totals of a campaign.
#[derive(Debug, Clone, Default)]
pub struct CampaignReport {
    pub schedules: u64,
    pub steps: u64,
    pub faults: u64,
    pub promotions: u64,
    pub acked: u64,
    pub released: u64,
}

impl CampaignReport {
    /// Counts one schedule that passed.
    pub fn add(&mut self, r: &Report) {
        self.schedules += 1;
        self.steps += r.steps;
        self.faults += r.faults as u64;
        self.promotions += r.promotions as u64;
        self.acked += r.acked as u64;
        self.released += r.released as u64;
    }
}

impl std::fmt::Display for CampaignReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} schedules, {} steps, {} faults, {} promotions, {} acknowledged writes, {} leader keys released by fence guards",
            self.schedules, self.steps, self.faults, self.promotions, self.acked, self.released
        )
    }
}
