//! The cluster's timing, derived once: `ttl`, `loop_wait`, `retry_timeout` and the fence policy
//! of the configuration in force (`bootstrap.dcs` until the DCS `config` key is read, then that
//! key). The HA loop computes it on every change of the `config` key and sends it on a
//! [`tokio::sync::watch`] channel; the DCS clients read their lease TTL, request timeout and
//! keepalive interval from the receiving end, so no value is pushed into them by hand and none
//! can silently fall back to a default.

use std::time::Duration;

use super::schema::{Config, DynamicConfig};

/// Safety parameters of the fence (see `ha::timing` and docs/fencing.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FencePolicy {
    /// Bound on the relative clock rate difference between us and etcd (e.g. 0.01 = 1 %).
    pub max_clock_drift: f64,
    /// Time reserved for the immediate stop to take effect before the lease may expire.
    pub stop_margin: Duration,
}

impl Default for FencePolicy {
    fn default() -> Self {
        FencePolicy {
            max_clock_drift: 0.01,
            stop_margin: Duration::from_millis(1500),
        }
    }
}

/// The timing every layer runs with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// The leader lease's TTL.
    pub ttl: Duration,
    /// The HA loop's period.
    pub loop_wait: Duration,
    /// Bound on every DCS request.
    pub retry_timeout: Duration,
    pub fence: FencePolicy,
}

impl Timing {
    /// The timing of a dynamic configuration, by the rule that loading and validation apply
    /// ([`DynamicConfig::adjust_timeouts`]: values raised to their minimum, `loop_wait + 2 ×
    /// retry_timeout ≤ ttl` restored), so a value that reaches a client is always one that
    /// validation would have produced.
    pub fn of(dynamic: &DynamicConfig) -> Timing {
        let mut d = dynamic.clone();
        // Warnings were given where the configuration was read (load, `from_dcs`).
        let _ = d.adjust_timeouts("");
        let secs = |s: u32| Duration::from_secs(s.into());
        Timing {
            ttl: secs(d.ttl),
            loop_wait: secs(d.loop_wait),
            retry_timeout: secs(d.retry_timeout),
            fence: FencePolicy::default(),
        }
    }

    /// The timing an agent starts with, before it has read the DCS `config` key.
    pub fn bootstrap(config: &Config) -> Timing {
        Timing::of(&config.bootstrap.dcs)
    }

    /// A receiver that always reads this timing (one-shot clients: the CLI, tests).
    pub fn fixed(self) -> tokio::sync::watch::Receiver<Timing> {
        tokio::sync::watch::channel(self).1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_follows_the_validation_rule() {
        let d = DynamicConfig {
            ttl: 3,
            loop_wait: 0,
            retry_timeout: 10,
            ..DynamicConfig::default()
        };
        let t = Timing::of(&d);
        // ttl raised to the minimum, then loop_wait 1 and retry_timeout (ttl − 1) / 2.
        assert_eq!(t.ttl, Duration::from_secs(5));
        assert_eq!(t.loop_wait, Duration::from_secs(1));
        assert_eq!(t.retry_timeout, Duration::from_secs(2));
        let d = DynamicConfig {
            ttl: 30,
            loop_wait: 2,
            retry_timeout: 7,
            ..DynamicConfig::default()
        };
        let t = Timing::of(&d);
        assert_eq!(
            (t.ttl, t.loop_wait, t.retry_timeout),
            (
                Duration::from_secs(30),
                Duration::from_secs(2),
                Duration::from_secs(7)
            )
        );
    }

    #[test]
    fn a_fixed_receiver_keeps_its_value() {
        let t = Timing::of(&DynamicConfig::default());
        let rx = t.fixed();
        assert_eq!(*rx.borrow(), t);
    }
}
