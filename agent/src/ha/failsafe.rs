//! Patroni's failsafe mode (`failsafe_mode`, patroni-compat.md §5.8), the part shared between
//! the HA loop and the REST API.
//!
//! While the DCS is out of reach, the leader `POST`s `/failsafe` to every member of the
//! `failsafe` topology each cycle. A replica that accepts remembers the sender as the live
//! leader for `ttl` and does not race for the lock meanwhile, even if it reaches the DCS and
//! sees the leader key expire. So once every member accepted a round sent at `s`, none of them
//! races before `s + ttl` by its own clock: the leader may stay primary as if its lease had been
//! renewed at `s` (the fence moves to the same deadline a renewal sent at `s` would give,
//! `super::timing::fence_deadline`). A member that does not accept ends the extension; the fence
//! then fires at the deadline of the last confirmed round or renewal, before any member that
//! accepted that round may race. A member outside the topology may not win a race at all
//! (`NotEligible::NotInFailsafeTopology`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The body of `POST /failsafe`, as Patroni's leader sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailsafeRequest {
    pub name: String,
    #[serde(default)]
    pub conn_url: Option<String>,
    #[serde(default)]
    pub api_url: Option<String>,
    /// Replication slots on the leader and their positions (the leader's own name with its
    /// WAL position included): replicas may advance their copies of permanent slots with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<BTreeMap<String, u64>>,
    /// pgwarden's addition (Patroni ignores it): the `ttl` in seconds the sender's fence
    /// counts on. The receiver holds off for at least that long, whatever its own `ttl`: a
    /// `ttl` lowered with `edit-config` reaches the members at different times (simulation
    /// seed 1797200001100: a replica that had the lower value raced before the leader's fence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
}

/// How one member answered a failsafe round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailsafeAnswer {
    pub name: String,
    /// 200 `Accepted`.
    pub accepted: bool,
    /// Why not, for the log.
    pub refusal: Option<String>,
}

impl FailsafeAnswer {
    /// `Ok` when the member answered 200 `Accepted`, else why not.
    pub fn from_result(name: String, answer: Result<(), String>) -> Self {
        FailsafeAnswer {
            name,
            accepted: answer.is_ok(),
            refusal: answer.err(),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    enabled: bool,
    ttl: Duration,
    /// On a replica: the leader that last sent `POST /failsafe`, when it arrived, and the
    /// `ttl` it counts on.
    leader: Option<(String, Instant, Duration)>,
    /// On the leader: the last round every member accepted was sent at this instant.
    held_since: Option<Instant>,
}

/// The failsafe state of this member.
#[derive(Debug, Default)]
pub struct Failsafe {
    state: Mutex<State>,
}

impl Failsafe {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A panic while holding this lock cannot leave the state half-written (every update is
        // one assignment), so a poisoned lock is still usable.
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Applies the dynamic configuration; turning the mode off forgets everything.
    pub fn configure(&self, enabled: bool, ttl: Duration) {
        self.with(|s| {
            if !enabled {
                s.leader = None;
                s.held_since = None;
            }
            s.enabled = enabled;
            s.ttl = ttl;
        })
    }

    /// `failsafe_mode` is on.
    pub fn enabled(&self) -> bool {
        self.with(|s| s.enabled)
    }

    /// A replica accepted `POST /failsafe` from `leader` at `now`; the sender counts on
    /// `sender_ttl` (when it says).
    pub fn leader_alive(&self, leader: &str, now: Instant, sender_ttl: Option<Duration>) {
        self.with(|s| {
            s.leader = Some((leader.to_owned(), now, sender_ttl.unwrap_or_default()));
        })
    }

    /// The leader that confirmed within `ttl` (ours or the one it counts on, the longer) that
    /// it runs (replica side), if any.
    pub fn live_leader(&self, now: Instant) -> Option<String> {
        self.with(|s| {
            let (name, at, theirs) = s.leader.as_ref()?;
            let hold = s.ttl.max(*theirs);
            (s.enabled && now.saturating_duration_since(*at) < hold).then(|| name.clone())
        })
    }

    /// The leader: every member accepted the round sent at `sent_at`.
    pub fn held(&self, sent_at: Instant) {
        self.with(|s| s.held_since = Some(sent_at))
    }

    /// The leader reached the DCS again, or a round was not accepted by everyone.
    pub fn release(&self) {
        self.with(|s| s.held_since = None)
    }

    /// Failsafe mode is in force on this member (Patroni's `failsafe_mode_is_active`): the
    /// leader keeps running on the members' word, or a replica heard from such a leader,
    /// within `ttl`.
    pub fn is_active(&self, now: Instant) -> bool {
        self.with(|s| {
            let recent = |at: Instant| now.saturating_duration_since(at) < s.ttl;
            s.enabled
                && (s.held_since.is_some_and(recent)
                    || s.leader.as_ref().is_some_and(|(_, at, _)| recent(*at)))
        })
    }
}

/// The topology the leader publishes in `failsafe`: every member's API URL, its own included.
pub fn topology(
    view: &crate::dcs::ClusterView,
    me: &str,
    my_api_url: &str,
) -> BTreeMap<String, String> {
    let mut members: BTreeMap<String, String> = view
        .members
        .iter()
        .filter(|m| !m.record.api_url.is_empty())
        .map(|m| (m.name.clone(), m.record.api_url.clone()))
        .collect();
    if !members.contains_key(me) && !my_api_url.is_empty() {
        members.insert(me.to_owned(), my_api_url.to_owned());
    }
    members
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_remembers_the_leader_for_a_ttl_only_while_the_mode_is_on() {
        let f = Failsafe::new();
        let t0 = Instant::now();
        f.configure(true, Duration::from_secs(10));
        f.leader_alive("pg0", t0, None);
        assert_eq!(
            f.live_leader(t0 + Duration::from_secs(9)).as_deref(),
            Some("pg0")
        );
        assert!(f.is_active(t0 + Duration::from_secs(9)));
        assert_eq!(f.live_leader(t0 + Duration::from_secs(10)), None);
        assert!(!f.is_active(t0 + Duration::from_secs(10)));
        f.leader_alive("pg0", t0, None);
        f.configure(false, Duration::from_secs(10));
        assert_eq!(f.live_leader(t0), None);
    }

    #[test]
    fn the_leader_is_active_from_an_accepted_round_until_released() {
        let f = Failsafe::new();
        let t0 = Instant::now();
        f.configure(true, Duration::from_secs(10));
        assert!(!f.is_active(t0));
        f.held(t0);
        assert!(f.is_active(t0 + Duration::from_secs(5)));
        f.release();
        assert!(!f.is_active(t0 + Duration::from_secs(5)));
    }
}
