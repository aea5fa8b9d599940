//! The token naming the leader record this agent wrote, kept for the fence guard's crash
//! release (`crate::postgres::crash_release`).

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Receives every change of the token synchronously, in the task that changes it.
pub type ReleaseTokenSink = Arc<dyn Fn(Option<&str>) + Send + Sync>;

/// The current token, observable through a watch channel and handed to a sink at once.
///
/// The sink is why this is not a bare watch channel: a Kubernetes agent sets its token right
/// before a write that names it holder, and a forwarding task would let a kill -9 in between
/// leave the guard without it, once the write was applied (the release then finds nothing of
/// ours and the Lease has to run out).
pub struct ReleaseToken {
    current: watch::Sender<Option<String>>,
    sink: Mutex<Option<ReleaseTokenSink>>,
}

impl Default for ReleaseToken {
    fn default() -> Self {
        Self {
            current: watch::channel(None).0,
            sink: Mutex::new(None),
        }
    }
}

impl ReleaseToken {
    /// Sets the token; the sink hears of a change before this returns.
    pub fn set(&self, token: Option<String>) {
        // The sink lock is held across the change so that two setters cannot hand the sink
        // their values in the opposite order of the changes.
        let sink = self.sink.lock();
        let changed = self.current.send_if_modified(|t| {
            let changed = *t != token;
            *t = token.clone();
            changed
        });
        if changed {
            if let Ok(sink) = &sink {
                if let Some(sink) = sink.as_ref() {
                    sink(token.as_deref());
                }
            }
        }
    }

    /// Hands the current token to `sink` now, and every change from now on.
    pub fn set_sink(&self, sink: ReleaseTokenSink) {
        if let Ok(mut slot) = self.sink.lock() {
            sink(self.current.borrow().as_deref());
            *slot = Some(sink);
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.current.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sink_hears_the_current_token_and_each_change_once_in_order() {
        let token = ReleaseToken::default();
        token.set(Some("a".to_owned()));
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        token.set_sink(Arc::new(move |t| {
            h.lock().expect("not poisoned").push(t.map(str::to_owned));
        }));
        token.set(Some("a".to_owned()));
        token.set(Some("b".to_owned()));
        token.set(None);
        assert_eq!(
            *heard.lock().expect("not poisoned"),
            vec![Some("a".to_owned()), Some("b".to_owned()), None]
        );
        assert_eq!(*token.subscribe().borrow(), None);
    }
}
