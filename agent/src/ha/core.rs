//! What the HA loop remembers between cycles, and the rules over that memory, with no IO:
//! leader belief and the lease's certain end, the bootstrap-claim and primary-down timers,
//! crash counts and the restart backoff, the synchronous standbys chosen, the members and
//! `history` last seen, a scheduled restart. Time comes in as an argument, so these rules
//! are tested without a clock (and the simulation drives them with its own).
//!
//! The loop ([`super::HaLoop`]) owns one [`HaCore`]; it feeds it what it observed and asks it
//! what the observation and the decision must include.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::dcs::{ClusterView, HistoryLine, LeaseRenewal, Member};

use super::decide::{self, Action, Decision, NotEligible, Outcome};
use super::observe::{LeaseCheck, Observation, PostgresView};
use super::restart::RestartRequest;
use super::timing::{self, FencePolicy};

/// A postgres that exits within this time of its start counts as a failed start.
pub const QUICK_CRASH_WINDOW: Duration = Duration::from_secs(30);
/// Failed starts in a row after which the leader key is released instead of holding it
/// through another restart.
pub const FAILED_STARTS_LIMIT: u32 = 3;

/// The loop's memory between cycles (lost when the agent restarts, as Patroni's).
#[derive(Debug, Default)]
pub struct HaCore {
    pub fence: FencePolicy,
    /// The member our standby configuration points at.
    pub following: Option<String>,
    /// Promoted, CHECKPOINT not yet completed (published as `checkpoint_after_promote: false`).
    pub checkpoint_after_promote_pending: bool,
    /// The timeline whose lineage this agent last wrote to `history`.
    pub history_recorded_for: Option<u32>,
    /// The revision of the unfinished `initialize` claim seen with no `leader`, and since when
    /// (this agent's view).
    unclaimed_bootstrap_since: Option<(i64, Instant)>,
    /// Since when we have held the lock with postgres not running (for `primary_start_timeout`).
    primary_down_since: Option<Instant>,
    /// `POST /restart`'s `timeout`: replaces `primary_start_timeout` for the start that follows
    /// that restart (Patroni's `set_start_timeout`), until postgres runs again.
    pub restart_start_timeout: Option<Duration>,
    /// Members seen in recent views, with when they were last seen: a race asks them too, so
    /// that keys wiped from the DCS (`patronictl remove`, an emptied etcd) do not hide a
    /// running primary from the replicas.
    known_members: Vec<(Member, Instant)>,
    /// Member replication slots the leader keeps, with when their member was last seen
    /// (Patroni's `retain_slots`): a member whose key is gone (killed, or the former leader
    /// after a failover) finds its slot when it comes back within `member_slots_ttl`, so it
    /// streams at once instead of after postgres' retry interval.
    retained_slots: BTreeMap<String, Instant>,
    /// The last non-empty `history` seen, to rebuild the key with its timestamps if it is lost.
    pub known_history: Vec<HistoryLine>,
    /// Starts of postgres that crashed soon after, for backing off instead of restarting in a
    /// tight loop; reset once postgres has run for [`QUICK_CRASH_WINDOW`].
    pub quick_crashes: u32,
    last_start: Option<Instant>,
    crash_counted: bool,
    /// `synchronous_standby_names` as the sync planner last decided (leader only).
    pub sync_standby_names: String,
    /// Quorum commit: which listed standbys have caught up since they were listed.
    pub quorum_ready: super::quorum::Readiness,
    /// We hold `leader` as far as we know (our last renewal or acquisition succeeded).
    pub believes_leader: bool,
    pub lease_certain_until: Option<Instant>,
    /// The last renewal the DCS itself confirmed while we held the key (a failsafe round is
    /// not one): what decides whether the next cycle must renew (`timing::renewal_due`).
    pub dcs_renewal: Option<LeaseRenewal>,
    /// The sentence of the last cycle's outcome (logged at info only when it changes).
    pub last_outcome: String,
    /// `POST /restart {"schedule": …}` waiting for its time, with the postmaster start time
    /// when it was scheduled: a restart in between makes it pointless (Patroni cancels it).
    /// Kept in memory only, as Patroni does: an agent restart forgets it.
    pub scheduled_restart: Option<(RestartRequest, Option<String>)>,
}

impl HaCore {
    /// A fresh agent; `sync_standby_names` is what its files start with (strict mode's `*`).
    pub fn new(sync_standby_names: String) -> Self {
        HaCore {
            sync_standby_names,
            ..Default::default()
        }
    }

    /// A confirmed renewal: the lease is certain until its end by our clock, less the margin;
    /// returns the fence deadline to arm. A failsafe round counts here too, but it is not the DCS's word: once the DCS answers
    /// again, the next cycle renews for real ([`HaCore::dcs_renewed`] is the DCS's renewal).
    pub fn lease_renewed(&mut self, renewal: LeaseRenewal) -> Instant {
        self.dcs_renewal = None;
        self.believes_leader = true;
        self.lease_certain_until = Some(timing::lease_certain_until(renewal, self.fence));
        timing::fence_deadline(renewal, self.fence)
    }

    /// A renewal the DCS confirmed: as [`HaCore::lease_renewed`], and it may let later cycles
    /// skip theirs (`timing::renewal_due`).
    pub fn dcs_renewed(&mut self, renewal: LeaseRenewal) -> Instant {
        let deadline = self.lease_renewed(renewal);
        self.dcs_renewal = Some(renewal);
        deadline
    }

    /// We do not (or no longer) hold the leader key.
    pub fn lease_dropped(&mut self) {
        self.believes_leader = false;
        self.lease_certain_until = None;
        self.dcs_renewal = None;
    }

    /// May postgres become writable now (the lease certain for at least the stop margin)?
    pub fn may_open_for_writes(&self, now: Instant) -> bool {
        timing::may_open_for_writes(self.lease_certain_until, self.fence, now)
    }

    /// Keeps the members and `history` of `view` for when the DCS loses them; a member not
    /// seen for a ttl is forgotten (it left, or its key expired with its agent).
    pub fn remember(&mut self, view: &ClusterView, now: Instant, ttl: Duration) {
        self.known_members.retain(|(m, seen)| {
            now.saturating_duration_since(*seen) <= ttl && view.member(&m.name).is_none()
        });
        self.known_members
            .extend(view.members.iter().map(|m| (m.clone(), now)));
        if !view.history.is_empty() {
            self.known_history.clone_from(&view.history);
        }
    }

    /// The leader's member slots: `members`' slot names (ours included, so that a new leader
    /// keeps one for us) are seen `now`; a slot not seen for `member_slots_ttl` is dropped.
    /// Returns the slots to keep, published as `retain_slots` in `status`.
    pub fn retain_member_slots(
        &mut self,
        members: impl IntoIterator<Item = String>,
        now: Instant,
        member_slots_ttl: Duration,
    ) -> BTreeSet<String> {
        for slot in members {
            self.retained_slots.insert(slot, now);
        }
        self.retained_slots.retain(|slot, seen| {
            let keep = now.saturating_duration_since(*seen) < member_slots_ttl;
            if !keep {
                tracing::info!(
                    slot,
                    ttl_s = member_slots_ttl.as_secs(),
                    "replication slot of an absent member expired (member_slots_ttl)"
                );
            }
            keep
        });
        self.retained_slots.keys().cloned().collect()
    }

    /// On taking the lock: the slots the former leader retained (its `retain_slots`) are
    /// kept for a whole `member_slots_ttl` from now, as Patroni resets their retention on
    /// promotion.
    pub fn inherit_retained_slots(&mut self, retain_slots: &[String], now: Instant) {
        self.retained_slots = retain_slots.iter().map(|s| (s.clone(), now)).collect();
    }

    /// The slots retained as last computed, for the final `status` before the lock is let go.
    pub fn retained_slot_names(&self) -> Vec<String> {
        self.retained_slots.keys().cloned().collect()
    }

    /// Members remembered but missing from `view`.
    pub fn remembered_members<'a>(
        &'a self,
        view: &'a ClusterView,
    ) -> impl Iterator<Item = &'a Member> + 'a {
        self.known_members
            .iter()
            .map(|(m, _)| m)
            .filter(|m| view.member(&m.name).is_none())
    }

    /// Has `initialize` held an unfinished claim with no leader for long enough to withdraw
    /// it? `view` is `None` when the DCS could not be read (the timer keeps running).
    pub fn bootstrap_claim_abandoned(
        &mut self,
        view: Option<&ClusterView>,
        now: Instant,
        ttl: Duration,
        loop_wait: Duration,
    ) -> bool {
        if let Some(view) = view {
            self.unclaimed_bootstrap_since =
                decide::unfinished_bootstrap_claim_without_leader(view).map(|claim| {
                    match self.unclaimed_bootstrap_since {
                        Some((seen, since)) if seen == claim => (claim, since),
                        _ => (claim, now),
                    }
                });
        }
        self.unclaimed_bootstrap_since.is_some_and(|(_, since)| {
            timing::bootstrap_claim_abandoned(now - since, ttl, loop_wait)
        })
    }

    /// Has the lock holder's postgres been down for longer than `primary_start_timeout` (or
    /// the `timeout` of the `POST /restart` that stopped it)?
    pub fn primary_start_overdue(
        &mut self,
        holds_with_postgres_down: bool,
        now: Instant,
        primary_start_timeout: Duration,
    ) -> bool {
        self.primary_down_since =
            holds_with_postgres_down.then(|| self.primary_down_since.unwrap_or(now));
        if !holds_with_postgres_down {
            self.restart_start_timeout = None;
        }
        let timeout = self.restart_start_timeout.unwrap_or(primary_start_timeout);
        self.primary_down_since
            .is_some_and(|since| timing::primary_start_overdue(now - since, timeout))
    }

    /// Postgres is being started now.
    pub fn starting(&mut self, now: Instant) {
        self.last_start = Some(now);
        self.crash_counted = false;
    }

    /// Counts a crash soon after a start, once per crash; forgets the count once postgres has
    /// run for a while.
    pub fn observed_postgres(&mut self, view: &PostgresView, now: Instant) {
        let since_start = self.last_start.map(|t| now.saturating_duration_since(t));
        match view {
            // Counted from a start until postgres has run for a while, not until it first
            // accepts connections: a data directory recovering towards a target it cannot
            // reach opens read-only, then exits, and reset at each opening the loop restarted
            // it 132 times in 30 s while holding the leader key.
            PostgresView::Running(_) if since_start.is_none_or(|d| d >= QUICK_CRASH_WINDOW) => {
                self.quick_crashes = 0
            }
            PostgresView::Crashed if !self.crash_counted => {
                self.crash_counted = true;
                if since_start.is_some_and(|d| d < QUICK_CRASH_WINDOW) {
                    self.quick_crashes += 1;
                }
            }
            _ => {}
        }
    }

    /// How long to wait before the next start, if postgres keeps crashing right after starting:
    /// 1 s, 2 s, 4 s, … up to a minute. The first crash restarts at once (a primary's crash
    /// restart must be fast).
    pub fn restart_backoff(&self, now: Instant) -> Option<Duration> {
        if self.quick_crashes < 2 {
            return None;
        }
        let wait =
            Duration::from_secs(1 << (self.quick_crashes - 2).min(6)).min(Duration::from_secs(60));
        let since = self
            .last_start
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or(wait);
        (since < wait).then(|| wait - since)
    }

    /// After [`FAILED_STARTS_LIMIT`] starts in a row that postgres did not survive, the leader
    /// key is not held across the wait for the next start: a lock holder releases it (and
    /// says why), and a member without it does not race for it until its next start is due.
    /// Another member can lead meanwhile; the failing one tries again after the backoff.
    /// `last_exit` is how postgres last exited. Returns the decision and whether the release
    /// is news (to be logged as an error) rather than a repeat.
    pub fn hold_back_failing_starts(
        &self,
        obs: &Observation,
        decision: Decision,
        last_exit: &str,
        now: Instant,
    ) -> (Decision, Option<(bool, String)>) {
        if self.quick_crashes < FAILED_STARTS_LIMIT
            || !matches!(obs.postgres, PostgresView::Crashed)
        {
            return (decision, None);
        }
        let starts = |d: &Decision| {
            d.actions
                .iter()
                .any(|a| matches!(a, Action::StartPostgres { .. }))
        };
        let why = format!(
            "postgres exited {} times in a row within {QUICK_CRASH_WINDOW:?} of starting (last: {last_exit}; see the postgres log lines)",
            self.quick_crashes
        );
        let holds = matches!(obs.lease, LeaseCheck::Renewed(_));
        if holds && starts(&decision) {
            let news = !self.last_outcome.starts_with("postgres failed to start");
            return (
                Decision::new(
                    Outcome::LeaderStartFailed(why.clone()),
                    vec![Action::ReleaseLeader],
                ),
                Some((news, why)),
            );
        }
        let races = decision
            .actions
            .iter()
            .any(|a| matches!(a, Action::AcquireLeader));
        match self.restart_backoff(now) {
            Some(wait) if races && starts(&decision) => (
                Decision::new(
                    Outcome::NoLeaderNotEligible(NotEligible::StartsFailing(format!(
                        "{why}; next start in {wait:.0?}"
                    ))),
                    vec![],
                ),
                None,
            ),
            _ => (decision, None),
        }
    }

    /// A member running as a standby forgets the synchronous standbys it chose as a leader and
    /// starts again from what a standby's files hold (`*` in strict mode, else nothing). Kept,
    /// they came back on its next promotion: promoted with synchronous mode off since, it would
    /// run with `synchronous_standby_names` naming a standby, which nothing maintains in
    /// asynchronous mode, and its commits would hang once that standby went away.
    pub fn forget_sync_choice(&mut self, synchronous_mode: bool, strict: bool) {
        self.sync_standby_names = if synchronous_mode && strict {
            "*".into()
        } else {
            String::new()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::Versioned;

    fn crashed_after(core: &mut HaCore, start: Instant, after: Duration) {
        core.starting(start);
        core.observed_postgres(&PostgresView::Crashed, start + after);
    }

    #[test]
    fn an_absent_members_slot_is_kept_for_member_slots_ttl_and_inherited_on_promotion() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(1800);
        let mut core = HaCore::default();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let kept = core.retain_member_slots(names(&["node1", "node2", "node3"]), t0, ttl);
        assert_eq!(kept.len(), 3);
        // node3's key is gone: its slot stays until member_slots_ttl after it was last seen.
        let later = t0 + Duration::from_secs(1799);
        let kept = core.retain_member_slots(names(&["node1", "node2"]), later, ttl);
        assert!(kept.contains("node3"));
        let kept = core.retain_member_slots(names(&["node1", "node2"]), t0 + ttl, ttl);
        assert!(!kept.contains("node3"));
        assert!(kept.contains("node1"));
        // A new leader keeps what the former one retained for a whole ttl from its promotion.
        let mut successor = HaCore::default();
        successor.inherit_retained_slots(&names(&["node1", "node2", "node3"]), t0 + ttl);
        let kept = successor.retain_member_slots(names(&["node2"]), t0 + ttl + ttl / 2, ttl);
        assert_eq!(kept, ["node1", "node2", "node3"].map(String::from).into());
        // member_slots_ttl 0: only the members present now.
        let kept = successor.retain_member_slots(names(&["node2"]), t0 + ttl * 2, Duration::ZERO);
        assert!(kept.is_empty());
    }

    #[test]
    fn restart_backoff_starts_at_the_second_quick_crash_and_doubles() {
        let t0 = Instant::now();
        let mut core = HaCore::default();
        crashed_after(&mut core, t0, Duration::from_secs(1));
        assert_eq!(core.restart_backoff(t0 + Duration::from_secs(1)), None);
        crashed_after(&mut core, t0, Duration::from_secs(1));
        assert_eq!(
            core.restart_backoff(t0 + Duration::from_millis(200)),
            Some(Duration::from_millis(800))
        );
        crashed_after(&mut core, t0, Duration::from_secs(1));
        assert_eq!(core.restart_backoff(t0), Some(Duration::from_secs(2)));
        assert_eq!(core.restart_backoff(t0 + Duration::from_secs(2)), None);
    }

    #[test]
    fn a_crash_is_counted_once_and_a_long_run_resets_the_count() {
        let t0 = Instant::now();
        let mut core = HaCore::default();
        core.starting(t0);
        core.observed_postgres(&PostgresView::Crashed, t0 + Duration::from_secs(1));
        core.observed_postgres(&PostgresView::Crashed, t0 + Duration::from_secs(2));
        assert_eq!(core.quick_crashes, 1);
        // A crash after the window is not quick.
        crashed_after(&mut core, t0, QUICK_CRASH_WINDOW + Duration::from_secs(1));
        assert_eq!(core.quick_crashes, 1);
        core.starting(t0);
        core.observed_postgres(&PostgresView::Down, t0 + QUICK_CRASH_WINDOW);
        assert_eq!(core.quick_crashes, 1);
    }

    #[test]
    fn the_bootstrap_claim_timer_runs_through_unknown_views() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(30);
        let loop_wait = Duration::from_secs(10);
        let mut core = HaCore::default();
        let claimed = claim(5);
        assert!(!core.bootstrap_claim_abandoned(Some(&claimed), t0, ttl, loop_wait));
        let later = t0 + Duration::from_secs(3600);
        assert!(core.bootstrap_claim_abandoned(None, later, ttl, loop_wait));
        // A view without the claim stops the timer.
        assert!(!core.bootstrap_claim_abandoned(
            Some(&ClusterView::default()),
            later,
            ttl,
            loop_wait
        ));
    }

    fn claim(revision: i64) -> ClusterView {
        ClusterView {
            initialize: Some(Versioned {
                value: String::new(),
                revision,
            }),
            ..Default::default()
        }
    }

    /// Simulation seed 1796600013456: a claim withdrawn and made anew between two cycles is
    /// not the claim whose timer ran out.
    #[test]
    fn a_new_bootstrap_claim_is_timed_from_scratch() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(30);
        let loop_wait = Duration::from_secs(10);
        let mut core = HaCore::default();
        assert!(!core.bootstrap_claim_abandoned(Some(&claim(5)), t0, ttl, loop_wait));
        let later = t0 + Duration::from_secs(3600);
        assert!(!core.bootstrap_claim_abandoned(Some(&claim(9)), later, ttl, loop_wait));
        assert!(core.bootstrap_claim_abandoned(
            Some(&claim(9)),
            later + Duration::from_secs(3600),
            ttl,
            loop_wait
        ));
    }
}
