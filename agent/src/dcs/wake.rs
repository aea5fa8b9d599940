//! Waking the HA loop from a DCS watch task.

use std::sync::Mutex;

use tokio::sync::Notify;

use super::Wakeup;

/// Wakes the HA loop; a leader change outranks any other change.
#[derive(Debug, Default)]
pub(crate) struct WakeSignal {
    pending: Mutex<Option<Wakeup>>,
    notify: Notify,
}

impl WakeSignal {
    pub(crate) fn raise(&self, wakeup: Wakeup) {
        if let Ok(mut pending) = self.pending.lock() {
            if *pending != Some(Wakeup::LeaderChanged) {
                *pending = Some(wakeup);
            }
        }
        self.notify.notify_one();
    }

    pub(crate) fn take(&self) -> Option<Wakeup> {
        self.pending.lock().ok().and_then(|mut p| p.take())
    }

    /// Waits until something is raised or `deadline` passes.
    pub(crate) async fn wait(&self, deadline: tokio::time::Instant) -> Wakeup {
        loop {
            if let Some(w) = self.take() {
                return w;
            }
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep_until(deadline) => return Wakeup::Timeout,
            }
        }
    }
}
