//! Lease and fencing arithmetic, as plain functions of instants and durations.
//!
//! # The argument (see `docs/fencing.md`)
//! A renewal request sent at `s` (our clock) that etcd acknowledged with TTL `T` refreshed the
//! lease at some instant after `s`, so by etcd's clock the lease lives at least until `s + T`.
//! Clocks run at slightly different rates: over `T` seconds ours may run up to `drift · T` slow
//! relative to etcd's, so by our clock the lease is certainly valid until
//! `s + T · (1 − drift)`. We stop postgres `margin` before that instant, which leaves time for an
//! immediate shutdown to take effect. No other member can acquire the key before the lease
//! expires in etcd, so no two members accept writes at the same instant.

use std::time::{Duration, Instant};

use crate::dcs::LeaseRenewal;

pub use crate::config::FencePolicy;

/// The last instant (our clock) at which the lease is certainly still valid.
pub fn lease_certain_until(renewal: LeaseRenewal, policy: FencePolicy) -> Instant {
    let drift = policy.max_clock_drift.clamp(0.0, 0.5);
    renewal.sent_at + renewal.ttl.mul_f64(1.0 - drift)
}

/// The instant at which postgres must be stopped if no newer renewal has been confirmed.
pub fn fence_deadline(renewal: LeaseRenewal, policy: FencePolicy) -> Instant {
    let until = lease_certain_until(renewal, policy);
    until
        .checked_sub(policy.stop_margin)
        .unwrap_or(renewal.sent_at)
        .max(renewal.sent_at)
}

/// Does a renewal answer still confirm the lease when it is read at `now`? An answer that
/// arrives after its own fence deadline (the agent was frozen, or the request hung) proves
/// nothing for the time ahead: the fence may already have fired and another member may hold
/// the key by now. It counts as unconfirmed (simulation seed 2056, 3 members).
pub fn renewal_confirms(renewal: LeaseRenewal, policy: FencePolicy, now: Instant) -> bool {
    now < fence_deadline(renewal, policy)
}

/// May postgres be made writable (promoted, or started as a primary) at `now`, with the lease
/// certain until `certain_until`? Only with at least the stop margin left: an action that runs
/// late, after a freeze, must not open for writes on a lease that may have expired.
pub fn may_open_for_writes(
    certain_until: Option<Instant>,
    policy: FencePolicy,
    now: Instant,
) -> bool {
    certain_until.is_some_and(|until| now + policy.stop_margin < until)
}

/// Whether the leader sends a keepalive in this cycle, its last renewal confirmed by the DCS
/// being `last`. What a host loss costs is what the lease has left when the host dies, and a
/// lease renewed every cycle is younger at a random instant than Patroni's (benchmark, ttl 10 /
/// loop_wait 2: its leader's lease was on average ~0.8 s older, so its failover after a host
/// loss ~0.6 s faster). So the leader renews at most every other cycle (Patroni's own members
/// refresh when `loop_wait` has passed since the last refresh, every one or two cycles) — but
/// never skips a renewal unless the next cycle's one, answered within `retry_timeout`, still
/// lands before the fence deadline: a slow DCS never fences a healthy leader, and a DCS outage
/// is tolerated for at least `retry_timeout`, as long as Patroni tolerates it. At Patroni's
/// defaults (`ttl = loop_wait + 2 × retry_timeout`) that floor means every cycle, as before.
pub fn renewal_due(
    last: LeaseRenewal,
    policy: FencePolicy,
    loop_wait: Duration,
    retry_timeout: Duration,
    now: Instant,
) -> bool {
    let age = now.saturating_duration_since(last.sent_at);
    age >= loop_wait.mul_f64(1.5) || now + loop_wait + retry_timeout >= fence_deadline(last, policy)
}

/// Whether an unfinished bootstrap claim (`initialize` without a system identifier) seen with
/// no `leader` for `unclaimed_for` is abandoned. A member that wins the `initialize` race takes
/// `leader` right after, and holds it through the whole bootstrap; a claim that stays without a
/// leader for a ttl and two cycles belongs to a member that died, or whose create request timed
/// out but was applied, and without this every member would wait for it forever.
pub fn bootstrap_claim_abandoned(
    unclaimed_for: Duration,
    ttl: Duration,
    loop_wait: Duration,
) -> bool {
    unclaimed_for > ttl + 2 * loop_wait
}

/// When the next HA cycle starts: `loop_wait` after the previous start, or at once if the cycle
/// overran (Patroni: "Loop time exceeded, rescheduling immediately").
pub fn next_cycle(started: Instant, loop_wait: Duration, now: Instant) -> Instant {
    (started + loop_wait).max(now)
}

/// Whether the lock holder's postgres, not running as a primary for `down_for`, has used up
/// `primary_start_timeout` (Patroni §5.3: 0 means fail over as soon as the crash is seen). Only
/// then may the lock be released for a healthy replica; until then postgres restarts in place.
pub fn primary_start_overdue(down_for: Duration, primary_start_timeout: Duration) -> bool {
    down_for >= primary_start_timeout
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_bootstrap_claim_is_abandoned_after_a_ttl_and_two_cycles() {
        let s = Duration::from_secs;
        assert!(!bootstrap_claim_abandoned(s(13), s(10), s(2)));
        assert!(!bootstrap_claim_abandoned(s(14), s(10), s(2)));
        assert!(bootstrap_claim_abandoned(s(15), s(10), s(2)));
    }

    fn renewal(sent_at: Instant, ttl_s: u64) -> LeaseRenewal {
        LeaseRenewal {
            sent_at,
            ttl: Duration::from_secs(ttl_s),
        }
    }

    #[test]
    fn fence_fires_before_the_lease_can_expire() {
        let t0 = Instant::now();
        let policy = FencePolicy::default();
        let r = renewal(t0, 30);
        let deadline = fence_deadline(r, policy);
        assert!(deadline < t0 + Duration::from_secs(30));
        assert!(deadline + policy.stop_margin <= lease_certain_until(r, policy));
    }

    proptest! {
        /// For any TTL and drift within the bound, the fence deadline plus the stop margin is
        /// before the lease's expiry as measured by a clock running `drift` faster than ours.
        #[test]
        fn fence_precedes_expiry_under_bounded_drift(ttl in 1u64..120, drift in 0.0f64..0.01, latency_ms in 0u64..5000) {
            let t0 = Instant::now();
            let policy = FencePolicy::default();
            let r = renewal(t0, ttl);
            let deadline = fence_deadline(r, policy);
            // etcd refreshed the lease `latency` after we sent; its TTL elapses in
            // ttl / (1 + drift) seconds of our clock at worst.
            let expiry_ours = t0 + Duration::from_millis(latency_ms) + Duration::from_secs(ttl).mul_f64(1.0 / (1.0 + drift));
            prop_assert!(deadline <= expiry_ours);
            prop_assert!(deadline >= t0);
        }
    }

    #[test]
    fn a_renewal_read_after_its_fence_deadline_confirms_nothing() {
        let t0 = Instant::now();
        let policy = FencePolicy::default();
        let r = renewal(t0, 30);
        assert!(renewal_confirms(r, policy, t0 + Duration::from_secs(1)));
        let deadline = fence_deadline(r, policy);
        assert!(!renewal_confirms(r, policy, deadline));
        assert!(!renewal_confirms(r, policy, t0 + Duration::from_secs(60)));
    }

    #[test]
    fn postgres_opens_for_writes_only_on_a_lease_with_margin_left() {
        let t0 = Instant::now();
        let policy = FencePolicy::default();
        let until = lease_certain_until(renewal(t0, 30), policy);
        assert!(may_open_for_writes(Some(until), policy, t0));
        assert!(!may_open_for_writes(
            Some(until),
            policy,
            until - policy.stop_margin
        ));
        assert!(!may_open_for_writes(None, policy, t0));
    }

    #[test]
    fn the_leader_renews_every_other_cycle_only_where_the_ttl_leaves_room() {
        let t0 = Instant::now();
        let policy = FencePolicy::default();
        let s = Duration::from_secs;
        let due = |ttl, lw, retry, age| {
            renewal_due(renewal(t0, ttl), policy, s(lw), s(retry), t0 + s(age))
        };
        // ttl 10, loop_wait 2, retry_timeout 3: skipped one cycle after a renewal, due the next.
        assert!(!due(10, 2, 3, 0));
        assert!(!due(10, 2, 3, 2));
        assert!(due(10, 2, 3, 3));
        assert!(due(10, 2, 3, 4));
        // Patroni's defaults (ttl 30 = loop_wait 10 + 2 × retry_timeout 10): every cycle.
        assert!(!due(30, 10, 10, 0));
        assert!(due(30, 10, 10, 10));
        // A retry_timeout that leaves no room: every cycle.
        assert!(due(10, 2, 10, 2));
    }

    proptest! {
        /// A renewal skipped now can be sent a cycle later and still be answered, within
        /// `retry_timeout`, before the fence deadline of the last one.
        #[test]
        fn a_skipped_renewal_leaves_the_next_one_time_before_the_fence(
            ttl in 5u64..120, loop_wait in 1u64..30, retry in 1u64..30, age_ms in 0u64..120_000,
        ) {
            let t0 = Instant::now();
            let policy = FencePolicy::default();
            let last = renewal(t0, ttl);
            let now = t0 + Duration::from_millis(age_ms);
            let (lw, rt) = (Duration::from_secs(loop_wait), Duration::from_secs(retry));
            if !renewal_due(last, policy, lw, rt, now) {
                prop_assert!(now + lw + rt < fence_deadline(last, policy));
                prop_assert!(now.saturating_duration_since(t0) < lw.mul_f64(1.5));
            }
        }
    }

    #[test]
    fn overrun_cycle_restarts_at_once() {
        let t0 = Instant::now();
        let lw = Duration::from_secs(10);
        assert_eq!(next_cycle(t0, lw, t0 + Duration::from_secs(1)), t0 + lw);
        let late = t0 + Duration::from_secs(11);
        assert_eq!(next_cycle(t0, lw, late), late);
    }
}
