//! Watches that wake the HA loop: the leader Lease (a release or a new holder is acted on at
//! once; the observation also keeps the expiry clock precise), the member Pods (a Pod removed or
//! relabelled) and the state ConfigMaps (`config`, `failover`, `sync`, `initialize`).
//!
//! kube-runtime's watcher lists, then watches, and re-lists after errors with backoff; routine
//! watch failures are logged at debug (the HA loop's own requests report reachability).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tracing::debug;

use super::lease::LeaseTracker;
use super::record_of;
use crate::dcs::wake::WakeSignal;
use crate::dcs::Wakeup;

pub(super) async fn lease(
    api: Api<Lease>,
    name: String,
    tracker: Arc<Mutex<LeaseTracker>>,
    wake: Arc<WakeSignal>,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        let observed = match event {
            Ok(Event::Applied(l)) => Some(Some(l)),
            Ok(Event::Deleted(_)) => Some(None),
            Ok(Event::Restarted(list)) => Some(list.into_iter().next()),
            Err(e) => {
                debug!(error = %e, "leader Lease watch failed; retrying");
                None
            }
        };
        let Some(lease) = observed else { continue };
        let Ok(mut t) = tracker.lock() else { continue };
        let before = t.record().and_then(|r| r.holder.clone());
        t.observe(lease.as_ref().map(record_of), Instant::now());
        let after = t.record().and_then(|r| r.holder.clone());
        drop(t);
        if lease.is_none() || before != after {
            wake.raise(Wakeup::LeaderChanged);
        }
    }
}

pub(super) async fn pods(api: Api<Pod>, selector: String, role_key: String, wake: Arc<WakeSignal>) {
    let config = watcher::Config::default().labels(&selector);
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut roles: HashMap<String, Option<String>> = HashMap::new();
    let role_of = |p: &Pod| {
        p.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(&role_key).cloned())
    };
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Applied(p)) => {
                let name = p.metadata.name.clone().unwrap_or_default();
                let role = role_of(&p);
                if roles.insert(name, role.clone()) != Some(role) {
                    wake.raise(Wakeup::ClusterChanged);
                }
            }
            Ok(Event::Deleted(p)) => {
                roles.remove(&p.metadata.name.clone().unwrap_or_default());
                wake.raise(Wakeup::ClusterChanged);
            }
            Ok(Event::Restarted(list)) => {
                roles = list
                    .iter()
                    .map(|p| (p.metadata.name.clone().unwrap_or_default(), role_of(p)))
                    .collect();
                wake.raise(Wakeup::ClusterChanged);
            }
            Err(e) => debug!(error = %e, "member Pod watch failed; retrying"),
        }
    }
}

pub(super) async fn configmaps(
    api: Api<ConfigMap>,
    selector: String,
    status_map: String,
    wake: Arc<WakeSignal>,
) {
    let config = watcher::Config::default().labels(&selector);
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        match event {
            // `status` changes with every leader cycle under writes; nobody waits for it.
            Ok(Event::Applied(m)) | Ok(Event::Deleted(m))
                if m.metadata.name.as_deref() == Some(status_map.as_str()) => {}
            Ok(_) => wake.raise(Wakeup::ClusterChanged),
            Err(e) => debug!(error = %e, "state ConfigMap watch failed; retrying"),
        }
    }
}
