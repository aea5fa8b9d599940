//! Ending a running backup before the agent stops postgres on purpose (a switchover or
//! planned demotion, `POST /restart` of the leader, the agent's own shutdown).
//!
//! Postgres' shutdown ends pgBackRest's session, so a backup caught by it died as a failure
//! after postgres was already going down. Instead, the HA loop calls
//! [`Interrupter::end_running_backup`] just before it stops postgres: the backup's process
//! group gets SIGTERM (SIGKILL after 10 s, see [`super::command`]), the service records the run
//! as interrupted (not failed), hands a scheduled fire back in `backup_schedule` and releases
//! `backup_lock`, and only then does the call return; it waits at most [`MAX_WAIT`] (less when
//! the leader lease would not last that long), then postgres is stopped anyway. For [`HOLD`]
//! after such a call no backup or stanza check starts: the status the service follows still
//! shows a running primary while postgres goes down, and a handed-back fire was started again
//! against the stopping postgres (and failed) in the moment before the new leader took over.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The longest the HA loop waits for a backup to end before stopping postgres anyway:
/// pgBackRest's SIGKILL comes 10 s after SIGTERM, then the lock and the hand-back.
pub const MAX_WAIT: Duration = Duration::from_secs(15);

/// How long no backup starts after a planned stop of postgres began.
pub const HOLD: Duration = Duration::from_secs(30);

/// Margin kept before the leader lease's certain end: a member that waited for its backup
/// must still hold the lease while postgres stops.
const LEASE_MARGIN: Duration = Duration::from_secs(2);

/// The backup that runs now, as the HA loop sees it.
#[derive(Debug, Clone)]
struct Current {
    cancel: CancellationToken,
    /// Why the agent ended it, once it did.
    reason: Option<String>,
}

/// Shared by the backup service (which registers each backup) and the HA loop (which ends
/// it). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Interrupter {
    current: Arc<watch::Sender<Option<Current>>>,
    /// No backup starts before this instant (a planned stop of postgres is under way).
    hold_until: Arc<Mutex<Option<Instant>>>,
}

impl Default for Interrupter {
    fn default() -> Self {
        Interrupter {
            current: Arc::new(watch::channel(None).0),
            hold_until: Arc::default(),
        }
    }
}

impl Interrupter {
    /// A backup started; `cancel` ends it.
    pub(super) fn started(&self, cancel: CancellationToken) {
        self.current.send_replace(Some(Current {
            cancel,
            reason: None,
        }));
    }

    /// Why the agent ended the running backup, if it did.
    pub(super) fn reason(&self) -> Option<String> {
        self.current
            .borrow()
            .as_ref()
            .and_then(|c| c.reason.clone())
    }

    /// The backup ended and everything about it is recorded (report, hand-back, lock): wakes
    /// the HA loop waiting in [`Self::end_running_backup`].
    pub(super) fn ended(&self) {
        self.current.send_replace(None);
    }

    /// Whether a planned stop of postgres began less than [`HOLD`] ago: nothing starts now.
    pub(super) fn held(&self) -> bool {
        let until = *self.hold_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|u| Instant::now() < u)
    }

    /// Whether a backup runs now.
    pub fn is_running(&self) -> bool {
        self.current.borrow().is_some()
    }

    /// Ends the running backup, if any, and waits until the service recorded it as
    /// interrupted, at most `budget`. Returns at once when no backup runs.
    pub async fn end_running_backup(&self, why: &str, budget: Duration) {
        *self.hold_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + HOLD);
        let mut rx = self.current.subscribe();
        let mut signalled = false;
        self.current.send_if_modified(|c| match c {
            Some(c) if c.reason.is_none() => {
                c.reason = Some(why.to_owned());
                c.cancel.cancel();
                signalled = true;
                true
            }
            _ => false,
        });
        if rx.borrow_and_update().is_none() {
            return;
        }
        if signalled {
            info!(reason = %why, wait_seconds = budget.as_secs_f64(), "ending the running backup before postgres stops");
        }
        let ended = tokio::time::timeout(budget, rx.wait_for(Option::is_none))
            .await
            .is_ok_and(|r| r.is_ok());
        if ended {
            info!("the backup ended; postgres stops now");
        } else {
            warn!(
                waited_seconds = budget.as_secs_f64(),
                "the backup did not end in time; postgres stops anyway"
            );
        }
    }
}

/// How long the HA loop may wait for a backup before a planned stop of postgres: at most
/// [`MAX_WAIT`], and never past the leader lease's certain end (minus a margin), so that the
/// member waiting is still the leader when postgres stops.
pub fn wait_budget(lease_certain_until: Option<Instant>, now: Instant) -> Duration {
    match lease_certain_until {
        Some(until) => MAX_WAIT.min(until.saturating_duration_since(now + LEASE_MARGIN)),
        None => MAX_WAIT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_a_backup_the_call_returns_at_once() {
        let i = Interrupter::default();
        tokio::time::timeout(
            Duration::from_millis(100),
            i.end_running_backup("test", Duration::from_secs(60)),
        )
        .await
        .expect("returns at once");
    }

    #[tokio::test]
    async fn the_backup_is_cancelled_with_the_reason_and_the_call_waits_for_its_end() {
        let i = Interrupter::default();
        let cancel = CancellationToken::new();
        i.started(cancel.clone());
        let service = {
            let i = i.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                cancel.cancelled().await;
                assert_eq!(i.reason().as_deref(), Some("a switchover"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                i.ended();
            })
        };
        let t = Instant::now();
        i.end_running_backup("a switchover", Duration::from_secs(10))
            .await;
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert!(!i.is_running());
        assert!(i.held(), "nothing starts while postgres stops");
        service.await.expect("service");
    }

    #[tokio::test]
    async fn the_wait_is_bounded() {
        let i = Interrupter::default();
        let cancel = CancellationToken::new();
        i.started(cancel.clone());
        let t = Instant::now();
        i.end_running_backup("shutdown", Duration::from_millis(300))
            .await;
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert!(cancel.is_cancelled());
    }

    #[test]
    fn the_budget_stays_inside_the_lease() {
        let now = Instant::now();
        assert_eq!(wait_budget(None, now), MAX_WAIT);
        assert_eq!(
            wait_budget(Some(now + Duration::from_secs(60)), now),
            MAX_WAIT
        );
        assert_eq!(
            wait_budget(Some(now + Duration::from_secs(8)), now),
            Duration::from_secs(6)
        );
        assert_eq!(
            wait_budget(Some(now + Duration::from_secs(1)), now),
            Duration::ZERO
        );
    }
}
