//! The controller's own leader election, so several replicas can run and only one acts.
//!
//! A `coordination.k8s.io/v1` Lease, as client-go's leader election: acquire by create, renew by
//! replace with the last seen `resourceVersion` (a 409 means someone else wrote it: re-read,
//! never retry blindly). Another holder's lease is judged expired by *our* clock: only after
//! we have seen the same holder and the same `renewTime` for a whole `leaseDurationSeconds`,
//! never by comparing its `renewTime` with our wall clock. The rule is the agents' own
//! ([`pgwarden_api::lease::LeaseTracker`]), shared through `pgwarden-api`.
//!
//! This election is about who applies objects; failover of PostgreSQL never depends on it.
//! A controller that cannot renew in time stops acting ([`Elector::run`] returns) before
//! another replica may take over.

use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use pgwarden_api::lease::{LeaseRecord, LeaseState, LeaseTracker};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// Leader election settings.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    /// `leaseDurationSeconds`.
    pub lease_duration: Duration,
    /// Time between renewals; well under `lease_duration`.
    pub retry_period: Duration,
}

/// Participates in the election; `is_leader` reports whether this replica may act.
pub struct Elector {
    api: Api<Lease>,
    config: ElectionConfig,
    /// What we saw of the Lease, and since when by our clock.
    tracker: LeaseTracker,
    is_leader: watch::Sender<bool>,
}

impl Elector {
    pub fn new(client: Client, config: ElectionConfig) -> (Elector, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        let api = Api::namespaced(client, &config.namespace);
        (
            Elector {
                api,
                config,
                tracker: LeaseTracker::default(),
                is_leader: tx,
            },
            rx,
        )
    }

    /// Runs until leadership, once held, is lost (or cannot be confirmed in time). The caller
    /// then stops acting; the process exits and starts over as a candidate.
    pub async fn run(mut self) {
        // Our leadership is valid until this instant on our clock: the last confirmed renewal
        // was sent at `s`, so the lease lives until at least `s + duration` in the server's
        // view; we give up a retry period earlier.
        let mut valid_until: Option<Instant> = None;
        loop {
            let sent = Instant::now();
            match self.try_acquire_or_renew(sent).await {
                Ok(true) => {
                    let until = sent + self.config.lease_duration
                        - self.config.retry_period.min(self.config.lease_duration / 2);
                    if valid_until.is_none() {
                        info!(identity = %self.config.identity, "became the active controller");
                    }
                    valid_until = Some(until);
                    self.is_leader.send_replace(true);
                }
                Ok(false) => {
                    if valid_until.is_some() {
                        warn!("another controller holds the lease now; stopping");
                        self.is_leader.send_replace(false);
                        return;
                    }
                }
                Err(e) => warn!(error = %e, "leader election request failed"),
            }
            if let Some(until) = valid_until {
                if Instant::now() >= until {
                    warn!("could not renew the controller lease in time; stopping");
                    self.is_leader.send_replace(false);
                    return;
                }
                let next = (Instant::now() + self.config.retry_period).min(until);
                tokio::time::sleep_until(next).await;
            } else {
                tokio::time::sleep(self.config.retry_period).await;
            }
        }
    }

    /// A handle that releases our lease when the controller stops cleanly.
    pub fn releaser(&self) -> Releaser {
        Releaser {
            api: self.api.clone(),
            config: self.config.clone(),
        }
    }

    /// One round: `Ok(true)` when we hold the lease after it.
    async fn try_acquire_or_renew(&mut self, now: Instant) -> Result<bool, kube::Error> {
        let duration = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let micro_now = MicroTime(Utc::now());
        let existing = self.api.get_opt(&self.config.lease_name).await?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.lease_name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(micro_now.clone()),
                    renew_time: Some(micro_now),
                    lease_transitions: Some(0),
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.config.identity;
        if !ours && !holder.is_empty() {
            let observed_duration = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(duration).max(1)).unwrap_or(1),
            );
            self.tracker.observe(
                Some(LeaseRecord {
                    resource_version: lease.metadata.resource_version.clone().unwrap_or_default(),
                    holder: Some(holder.clone()),
                    renew_time: spec.renew_time.as_ref().map(|t| t.0.to_rfc3339()),
                    duration: observed_duration,
                    transitions: spec.lease_transitions.unwrap_or(0),
                    acquire_time: None,
                }),
                now.into_std(),
            );
            match self.tracker.state(&self.config.identity, now.into_std()) {
                LeaseState::Expired { .. } => {
                    info!(previous = %holder, "the controller lease expired; taking over");
                }
                _ => return Ok(false),
            }
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(duration),
            acquire_time: if ours {
                spec.acquire_time.clone()
            } else {
                Some(micro_now.clone())
            },
            renew_time: Some(micro_now),
            lease_transitions: Some(if ours { transitions } else { transitions + 1 }),
        });
        // `replace` sends the resourceVersion we read: a concurrent writer makes this a 409.
        match self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.tracker.forget();
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Gives up the controller Lease on a clean stop, as client-go's `ReleaseOnCancel`: the holder
/// is cleared (with the `resourceVersion` read, so a lease another replica took meanwhile is
/// left alone), and a waiting replica takes over at its next round instead of after a whole
/// `leaseDurationSeconds`.
pub struct Releaser {
    api: Api<Lease>,
    config: ElectionConfig,
}

impl Releaser {
    /// `Ok(true)`: we held the lease and released it. Call it only once nothing renews it any
    /// more (the [`Elector`] task is stopped) and nothing acts for this replica.
    pub async fn release(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await? else {
            return Ok(false);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Utc::now()));
        match self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
