//! The leader Lease as observed by this member, and who holds it — judged by our own clock.
//!
//! A `coordination.k8s.io/v1` Lease does not expire by itself: the API server only stores
//! `holderIdentity`, `renewTime` and `leaseDurationSeconds`. Each observer decides when it has
//! expired. Comparing `renewTime` (the holder's wall clock) with our wall clock would trust two
//! clocks to agree, so we never do that. Instead, as client-go's leader election and
//! cloudnative-pg do, we remember the instant (our monotonic clock) at which we first saw the
//! current `(holder, renewTime, leaseDurationSeconds)`, and judge the Lease expired only after a
//! full `leaseDurationSeconds` has passed on our clock without seeing it change.
//!
//! # Why the holder's fence stays safe
//! The holder sends a renewal at `s` (its clock). The API server stores it after `s`, and we can
//! only see it after that, so our "first seen" instant is after `s`. We take over no earlier than
//! `first seen + leaseDurationSeconds` by our clock, which — with the relative clock-rate bound
//! of the agent's `ha::timing` — is after `s + ttl·(1 − drift)` by the holder's clock, the
//! instant its fence is computed from (`docs/fencing.md`). A takeover is a replace with the `resourceVersion` we
//! judged expired; if the holder renewed meanwhile the server answers 409 and nobody takes over.
//!
//! Everything here is pure: time comes in as an argument.

use std::time::{Duration, Instant};

/// The parts of a Lease that matter for the election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub resource_version: String,
    /// `holderIdentity`; `None` (or empty) when released.
    pub holder: Option<String>,
    /// `renewTime` exactly as the server returned it (compared for equality only).
    pub renew_time: Option<String>,
    pub duration: Duration,
    pub transitions: i32,
    /// `acquireTime` as the server returned it, kept on renewals.
    pub acquire_time: Option<String>,
}

/// What a member may conclude from its observations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// Never read yet: nothing can be concluded.
    Unknown,
    /// No Lease object exists: acquire by create.
    Absent,
    /// The Lease exists and names nobody: acquire by replace with `resource_version`.
    Free { resource_version: String },
    /// Held by `holder`, not expired by our clock (or held by us: our own lease is ours until a
    /// renewal is refused).
    Held {
        holder: String,
        resource_version: String,
    },
    /// Held by `holder`, but unchanged for a full duration on our clock.
    Expired {
        holder: String,
        resource_version: String,
    },
}

/// Observations of one Lease over time.
#[derive(Debug, Default)]
pub struct LeaseTracker {
    /// `None` inside: the Lease was seen to be absent.
    observed: Option<Option<LeaseRecord>>,
    /// When we first saw the current holder/renewTime/duration.
    seen_at: Option<Instant>,
}

/// `resourceVersion`s are etcd revisions in practice; an unparsable one compares as unknown.
pub fn parse_resource_version(rv: &str) -> Option<i64> {
    rv.parse().ok()
}

impl LeaseRecord {
    fn holder(&self) -> Option<&str> {
        self.holder.as_deref().filter(|h| !h.is_empty())
    }

    /// Whether `other` shows a renewal or a change of holder relative to `self`.
    fn same_term(&self, other: &LeaseRecord) -> bool {
        self.holder() == other.holder()
            && self.renew_time == other.renew_time
            && self.duration == other.duration
    }
}

impl LeaseTracker {
    /// Records what a read or a watch event returned at `now`. A record older than the one we
    /// know (smaller `resourceVersion`, e.g. a late watch event) is ignored.
    pub fn observe(&mut self, lease: Option<LeaseRecord>, now: Instant) {
        if let (Some(Some(known)), Some(new)) = (&self.observed, &lease) {
            if let (Some(a), Some(b)) = (
                parse_resource_version(&known.resource_version),
                parse_resource_version(&new.resource_version),
            ) {
                if b < a {
                    return;
                }
            }
        }
        let same = match (&self.observed, &lease) {
            (Some(Some(known)), Some(new)) => known.same_term(new),
            (Some(None), None) => true,
            _ => false,
        };
        if !same || self.seen_at.is_none() {
            self.seen_at = Some(now);
        }
        self.observed = Some(lease);
    }

    /// Forgets everything (for example after a write whose outcome is unknown).
    pub fn forget(&mut self) {
        self.observed = None;
        self.seen_at = None;
    }

    /// The last record seen, if a Lease was seen.
    pub fn record(&self) -> Option<&LeaseRecord> {
        self.observed.as_ref().and_then(|o| o.as_ref())
    }

    /// What `me` may conclude at `now`.
    pub fn state(&self, me: &str, now: Instant) -> LeaseState {
        let Some(observed) = &self.observed else {
            return LeaseState::Unknown;
        };
        let Some(record) = observed else {
            return LeaseState::Absent;
        };
        let resource_version = record.resource_version.clone();
        let Some(holder) = record.holder() else {
            return LeaseState::Free { resource_version };
        };
        let holder = holder.to_owned();
        if holder == me {
            return LeaseState::Held {
                holder,
                resource_version,
            };
        }
        match self.expires_at() {
            Some(at) if now >= at => LeaseState::Expired {
                holder,
                resource_version,
            },
            _ => LeaseState::Held {
                holder,
                resource_version,
            },
        }
    }

    /// When another member's Lease expires by our clock if nothing changes.
    pub fn expires_at(&self) -> Option<Instant> {
        let record = self.record()?;
        record.holder()?;
        Some(self.seen_at? + record.duration)
    }

    /// The expiry of a Lease held by someone other than `me` that is still ahead of `now`: the
    /// instant to wake up and race.
    pub fn next_expiry(&self, me: &str, now: Instant) -> Option<Instant> {
        let record = self.record()?;
        if record.holder() == Some(me) {
            return None;
        }
        self.expires_at().filter(|at| *at > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(rv: &str, holder: Option<&str>, renew: &str) -> LeaseRecord {
        LeaseRecord {
            resource_version: rv.to_owned(),
            holder: holder.map(str::to_owned),
            renew_time: Some(renew.to_owned()),
            duration: Duration::from_secs(10),
            transitions: 0,
            acquire_time: None,
        }
    }

    #[test]
    fn expiry_is_judged_from_when_we_first_saw_the_renewal() {
        let t0 = Instant::now();
        let mut tracker = LeaseTracker::default();
        tracker.observe(Some(record("5", Some("a"), "r1")), t0);
        // Re-reading the same renewal does not move the clock forward.
        tracker.observe(
            Some(record("5", Some("a"), "r1")),
            t0 + Duration::from_secs(6),
        );
        assert!(matches!(
            tracker.state("b", t0 + Duration::from_secs(9)),
            LeaseState::Held { .. }
        ));
        assert_eq!(
            tracker.state("b", t0 + Duration::from_secs(10)),
            LeaseState::Expired {
                holder: "a".into(),
                resource_version: "5".into()
            }
        );
    }

    #[test]
    fn a_renewal_restarts_the_observers_clock_whatever_its_timestamp_says() {
        let t0 = Instant::now();
        let mut tracker = LeaseTracker::default();
        tracker.observe(Some(record("5", Some("a"), "r1")), t0);
        // The holder's wall clock may be far behind ours: only the change counts.
        tracker.observe(
            Some(record("6", Some("a"), "1970-01-01T00:00:00.000000Z")),
            t0 + Duration::from_secs(8),
        );
        assert!(matches!(
            tracker.state("b", t0 + Duration::from_secs(17)),
            LeaseState::Held { .. }
        ));
        assert!(matches!(
            tracker.state("b", t0 + Duration::from_secs(18)),
            LeaseState::Expired { .. }
        ));
    }

    #[test]
    fn a_late_watch_event_does_not_roll_the_lease_back() {
        let t0 = Instant::now();
        let mut tracker = LeaseTracker::default();
        tracker.observe(Some(record("7", Some("b"), "r2")), t0);
        tracker.observe(Some(record("6", Some("a"), "r1")), t0);
        assert_eq!(
            tracker.record().and_then(|r| r.holder.clone()),
            Some("b".into())
        );
    }

    #[test]
    fn a_first_sight_waits_a_full_duration_and_our_own_lease_never_expires_for_us() {
        let t0 = Instant::now();
        let mut tracker = LeaseTracker::default();
        assert_eq!(tracker.state("a", t0), LeaseState::Unknown);
        tracker.observe(None, t0);
        assert_eq!(tracker.state("a", t0), LeaseState::Absent);
        tracker.observe(Some(record("3", Some("a"), "r")), t0);
        let later = t0 + Duration::from_secs(3600);
        assert!(matches!(tracker.state("a", later), LeaseState::Held { .. }));
        assert_eq!(tracker.next_expiry("a", t0), None);
        assert_eq!(
            tracker.next_expiry("b", t0),
            Some(t0 + Duration::from_secs(10))
        );
        tracker.observe(Some(record("4", None, "r")), t0);
        assert_eq!(
            tracker.state("b", t0),
            LeaseState::Free {
                resource_version: "4".into()
            }
        );
    }
}
