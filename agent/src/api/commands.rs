//! The write side of the REST API (`patroni-compat.md` §2.8, §2.9): switchover and failover
//! requests become the `failover` key that the HA loops act on; `PATCH`/`PUT /config` change the
//! dynamic configuration with a compare-and-set; restart (checked by [`crate::ha::restart`]),
//! reload and reinitialise are handed to the HA loop as typed requests
//! ([`crate::ha::commands::LoopRequest`]) whose typed replies are mapped here to status codes.
//! Checks and messages are Patroni's, since `patronictl` prints them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::Method;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::info;

use super::{ApiCommand, ApiReply};
use crate::dcs::{ClusterView, Dcs, FailoverRequest};
use crate::ha::commands::{
    CancelRestartReply, LoopRequest, ReinitializeReply, ReloadReply, RestartReply,
};
use crate::state::AgentStatus;

impl From<ReloadReply> for ApiReply {
    fn from(reply: ReloadReply) -> Self {
        match reply {
            ReloadReply::Scheduled => ApiReply::new(202, "reload scheduled"),
            ReloadReply::NameOrScopeChanged => ApiReply::new(
                400,
                "name and scope cannot change on reload; restart the agent",
            ),
            ReloadReply::Invalid(e) => {
                ApiReply::new(400, format!("the configuration is invalid: {e}"))
            }
        }
    }
}

impl From<RestartReply> for ApiReply {
    fn from(reply: RestartReply) -> Self {
        match reply {
            RestartReply::Scheduled => ApiReply::new(202, "Restart scheduled"),
            RestartReply::AlreadyScheduled => {
                ApiReply::new(409, "Another restart is already scheduled")
            }
            RestartReply::ConditionsNotSatisfied => {
                ApiReply::new(503, "restart conditions are not satisfied")
            }
            RestartReply::TaskInProgress(kind) => {
                ApiReply::new(503, format!("{kind} already in progress"))
            }
            RestartReply::Restarted => ApiReply::new(200, "restarted successfully"),
            RestartReply::StopFailed(e) => ApiReply::new(503, format!("restart failed: {e}")),
            RestartReply::Failed => ApiReply::new(503, "restart failed"),
            RestartReply::StillStarting => ApiReply::new(503, "postgres is still starting"),
        }
    }
}

impl From<CancelRestartReply> for ApiReply {
    fn from(reply: CancelRestartReply) -> Self {
        match reply {
            CancelRestartReply::Cancelled => ApiReply::new(200, "scheduled restart deleted"),
            CancelRestartReply::NoneScheduled => ApiReply::new(404, "no restarts are scheduled"),
        }
    }
}

impl From<ReinitializeReply> for ApiReply {
    fn from(reply: ReinitializeReply) -> Self {
        match reply {
            ReinitializeReply::Started => ApiReply::new(200, "reinitialize started"),
            ReinitializeReply::NoLeader => {
                ApiReply::new(503, "Cluster has no leader, can not reinitialize")
            }
            ReinitializeReply::IsLeader => {
                ApiReply::new(503, "I am the leader, can not reinitialize")
            }
            ReinitializeReply::TaskInProgress(kind) => {
                ApiReply::new(503, format!("{kind} already in progress"))
            }
            ReinitializeReply::RemoveFailed(e) => ApiReply::new(503, e),
        }
    }
}

/// What the command server needs.
pub struct CommandContext {
    pub dcs: Arc<dyn Dcs>,
    pub status: watch::Receiver<Arc<AgentStatus>>,
    pub to_loop: mpsc::Sender<LoopRequest>,
    pub name: String,
}

/// Serves API write commands until the channel closes.
pub async fn serve(mut rx: mpsc::Receiver<ApiCommand>, ctx: Arc<CommandContext>) {
    while let Some(command) = rx.recv().await {
        let ctx = ctx.clone();
        // Switchovers wait for the outcome; other requests must not queue behind them.
        tokio::spawn(async move {
            let reply = handle(&ctx, &command.method, &command.path, &command.body).await;
            let _ = command.reply.send(reply);
        });
    }
}

fn text_field(body: &Map<String, Value>, key: &str) -> Option<String> {
    body.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

async fn handle(
    ctx: &CommandContext,
    method: &Method,
    path: &str,
    body: &Map<String, Value>,
) -> ApiReply {
    match (method.as_str(), path) {
        ("POST", "/reload") => to_loop(ctx, |reply| LoopRequest::Reload { reply }).await,
        ("POST", "/switchover") => switchover(ctx, body, false).await,
        ("POST", "/failover") => switchover(ctx, body, true).await,
        ("DELETE", "/switchover") => delete_switchover(ctx).await,
        ("PATCH", "/config") => patch_config(ctx, body).await,
        ("PUT", "/config") => put_config(ctx, body).await,
        ("POST", "/restart") => {
            let paused = ctx.status.borrow().paused;
            match crate::ha::restart::RestartRequest::parse(body, chrono::Utc::now(), paused) {
                Ok(request) => to_loop(ctx, |reply| LoopRequest::Restart { request, reply }).await,
                Err(reply) => reply,
            }
        }
        ("POST", "/reinitialize") => {
            let force = body.get("force").and_then(Value::as_bool).unwrap_or(false);
            to_loop(ctx, |reply| LoopRequest::Reinitialize { force, reply }).await
        }
        ("DELETE", "/restart") => {
            to_loop(ctx, |reply| LoopRequest::CancelScheduledRestart { reply }).await
        }
        _ => ApiReply::new(501, format!("{method} {path} is not supported")),
    }
}

async fn to_loop<T: Into<ApiReply>>(
    ctx: &CommandContext,
    make: impl FnOnce(oneshot::Sender<T>) -> LoopRequest,
) -> ApiReply {
    let (reply, rx) = oneshot::channel();
    if ctx.to_loop.send(make(reply)).await.is_err() {
        return ApiReply::new(503, "the agent is shutting down");
    }
    rx.await.map_or_else(
        |_| ApiReply::new(503, "the agent did not answer"),
        Into::into,
    )
}

/// Parses `scheduled_at`: RFC 3339 with an explicit offset.
fn parse_schedule(at: &str) -> Result<chrono::DateTime<chrono::Utc>, ApiReply> {
    match chrono::DateTime::parse_from_rfc3339(at) {
        Ok(t) => Ok(t.with_timezone(&chrono::Utc)),
        Err(_) => {
            if chrono::NaiveDateTime::parse_from_str(at, "%Y-%m-%dT%H:%M:%S").is_ok()
                || chrono::NaiveDateTime::parse_from_str(at, "%Y-%m-%d %H:%M:%S").is_ok()
            {
                Err(ApiReply::new(
                    400,
                    "Timezone information is mandatory for the scheduled switchover",
                ))
            } else {
                Err(ApiReply::new(422, format!("Unable to parse scheduled timestamp {at:?}. It should be in an unambiguous format, e.g. ISO 8601")))
            }
        }
    }
}

async fn switchover(ctx: &CommandContext, body: &Map<String, Value>, failover: bool) -> ApiReply {
    let mut leader = text_field(body, "leader");
    let candidate = text_field(body, "candidate").or_else(|| text_field(body, "member"));
    let scheduled_at = text_field(body, "scheduled_at");
    let status = ctx.status.borrow().clone();
    let paused = status.paused;
    if failover && candidate.is_none() {
        return ApiReply::new(
            400,
            "Failover could be performed only to a specific candidate",
        );
    }
    if !failover && leader.is_none() {
        return ApiReply::new(
            400,
            "Switchover could be performed only from a specific leader",
        );
    }
    if let Some(at) = &scheduled_at {
        if failover {
            return ApiReply::new(400, "Failover can't be scheduled");
        }
        if paused {
            return ApiReply::new(400, "Can't schedule switchover in the paused state");
        }
        match parse_schedule(at) {
            Err(reply) => return reply,
            Ok(t) if t < chrono::Utc::now() => {
                return ApiReply::new(422, "Can't schedule switchover in the past")
            }
            Ok(_) => {}
        }
    }
    if paused && candidate.is_none() {
        return ApiReply::new(
            400,
            "Switchover is possible only to a specific candidate in a paused state",
        );
    }
    // `/failover` with a leader is a switchover (patronictl 3.0.2 sends one).
    let action = if failover && leader.is_none() {
        "failover"
    } else {
        "switchover"
    };
    if leader.is_some() && leader == candidate {
        return ApiReply::new(400, "Switchover target and source are the same");
    }
    let view = match ctx.dcs.cluster().await {
        Ok(v) => v,
        Err(e) => {
            return ApiReply::new(
                503,
                format!("cannot read the cluster: {}", crate::error::error_chain(&e)),
            )
        }
    };
    if scheduled_at.is_none() {
        if let Err(reply) =
            check_candidates(&view, leader.as_deref(), candidate.as_deref(), action).await
        {
            return reply;
        }
    }
    if action == "failover" {
        leader = None;
    }
    let request = FailoverRequest {
        leader: leader.clone(),
        member: candidate.clone(),
        scheduled_at: scheduled_at.clone(),
    };
    if let Err(e) = ctx.dcs.write_failover(&request, None).await {
        info!(error = %crate::error::error_chain(&e), "could not write the failover key");
        return ApiReply::new(503, "failed to write failover key into DCS");
    }
    info!(?request, "wrote the failover key");
    if scheduled_at.is_some() {
        return ApiReply::new(202, "Switchover scheduled");
    }
    wait_for_outcome(ctx, view.leader_name(), candidate.as_deref(), action).await
}

/// §2.9 step 7: is there anyone to hand over to?
async fn check_candidates(
    view: &ClusterView,
    leader: Option<&str>,
    candidate: Option<&str>,
    action: &str,
) -> Result<(), ApiReply> {
    let current = view.leader_name();
    if let Some(l) = leader {
        if current != Some(l) {
            return Err(ApiReply::new(412, "leader name does not match"));
        }
    }
    // With quorum commit any member may be the candidate (it gathers the votes).
    let sync_mode = view.synchronous_mode() == crate::config::SynchronousMode::On;
    if let Some(c) = candidate {
        if action == "switchover"
            && sync_mode
            && !view.sync.as_ref().is_some_and(|s| s.value.lists(c))
        {
            return Err(ApiReply::new(
                412,
                "candidate name does not match with sync_standby",
            ));
        }
        if view.member(c).is_none() {
            return Err(ApiReply::new(412, "candidate does not exists"));
        }
    }
    let others: Vec<_> = view
        .members
        .iter()
        .filter(|m| Some(m.name.as_str()) != current)
        .filter(|m| candidate.is_none_or(|c| c == m.name))
        .collect();
    if others.is_empty() {
        return Err(ApiReply::new(
            412,
            format!("{action} is not possible: cluster does not have members except leader"),
        ));
    }
    let asks = others.iter().map(|m| async move {
        crate::peer::fetch_status(&m.name, &m.record.api_url, Duration::from_secs(2))
            .await
            .ok()
    });
    let good = futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .any(|p| !p.nofailover && !p.watchdog_failed);
    if !good {
        return Err(ApiReply::new(
            412,
            format!("{action} is not possible: no good candidates have been found"),
        ));
    }
    Ok(())
}

async fn wait_for_outcome(
    ctx: &CommandContext,
    old_leader: Option<&str>,
    candidate: Option<&str>,
    action: &str,
) -> ApiReply {
    let loop_wait = ctx.status.borrow().loop_wait.as_secs().max(10);
    let limit = Duration::from_secs(2 * loop_wait);
    let deadline = Instant::now() + limit;
    let past = if action == "failover" {
        "failed over"
    } else {
        "switched over"
    };
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(view) = ctx.dcs.cluster().await else {
            continue;
        };
        match view.leader_name() {
            Some(new) if Some(new) != old_leader => {
                return match candidate {
                    Some(c) if c != new => ApiReply::new(
                        200,
                        format!("Switched over to \"{new}\" instead of \"{c}\""),
                    ),
                    _ => ApiReply::new(200, format!("Successfully {past} to \"{new}\"")),
                };
            }
            _ => {}
        }
        if view.failover.is_none() && view.leader_name() == old_leader && old_leader.is_some() {
            return ApiReply::new(503, "Switchover failed");
        }
    }
    ApiReply::new(
        503,
        format!(
            "Switchover status unknown after {} seconds; operation may still be in progress",
            limit.as_secs()
        ),
    )
}

async fn delete_switchover(ctx: &CommandContext) -> ApiReply {
    let view = match ctx.dcs.cluster().await {
        Ok(v) => v,
        Err(e) => {
            return ApiReply::new(
                503,
                format!("cannot read the cluster: {}", crate::error::error_chain(&e)),
            )
        }
    };
    match &view.failover {
        Some(f) if f.value.scheduled_at.is_some() => {
            match ctx
                .dcs
                .write_failover(&FailoverRequest::default(), Some(f.revision))
                .await
            {
                Ok(true) => ApiReply::new(200, "scheduled switchover deleted"),
                Ok(false) => ApiReply::new(409, "the switchover changed while deleting it"),
                Err(e) => ApiReply::new(
                    503,
                    format!(
                        "cannot delete the switchover: {}",
                        crate::error::error_chain(&e)
                    ),
                ),
            }
        }
        _ => ApiReply::new(404, "no switchover is scheduled"),
    }
}

/// Recursive merge; `null` deletes a key (Patroni's `patch_config`).
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        match (target.get_mut(k), v) {
            (_, Value::Null) => {
                target.remove(k);
            }
            (Some(Value::Object(t)), Value::Object(p)) => merge(t, p),
            _ => {
                target.insert(k.clone(), v.clone());
            }
        }
    }
}

async fn patch_config(ctx: &CommandContext, patch: &Map<String, Value>) -> ApiReply {
    if let Err(reason) = crate::config::dynamic::check_patch(patch) {
        return ApiReply::new(400, reason);
    }
    let view = match ctx.dcs.cluster().await {
        Ok(v) => v,
        Err(e) => {
            return ApiReply::new(
                503,
                format!("cannot read the cluster: {}", crate::error::error_chain(&e)),
            )
        }
    };
    let Some(current) = view.config else {
        return ApiReply::new(503, "The cluster has no configuration in the DCS");
    };
    let mut merged = current.value.as_object().cloned().unwrap_or_default();
    merge(&mut merged, patch);
    let merged = Value::Object(merged);
    match ctx.dcs.write_config(&merged, Some(current.revision)).await {
        Ok(true) => {
            info!(%merged, "configuration patched");
            ApiReply::new(200, merged.to_string())
        }
        Ok(false) => ApiReply::new(409, "the configuration changed concurrently; retry"),
        Err(e) => ApiReply::new(
            503,
            format!(
                "cannot write the configuration: {}",
                crate::error::error_chain(&e)
            ),
        ),
    }
}

async fn put_config(ctx: &CommandContext, config: &Map<String, Value>) -> ApiReply {
    if let Err(reason) = crate::config::dynamic::check_patch(config) {
        return ApiReply::new(400, reason);
    }
    let value = Value::Object(config.clone());
    match ctx.dcs.write_config(&value, None).await {
        Ok(_) => ApiReply::new(200, value.to_string()),
        Err(e) => ApiReply::new(
            502,
            format!(
                "cannot write the configuration: {}",
                crate::error::error_chain(&e)
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_is_recursive_and_null_deletes() {
        let mut target = serde_json::json!({"ttl": 30, "postgresql": {"parameters": {"a": 1, "b": 2}}, "pause": true})
            .as_object()
            .cloned()
            .expect("object");
        let patch = serde_json::json!({"postgresql": {"parameters": {"b": null, "c": 3}}, "pause": null, "loop_wait": 5})
            .as_object()
            .cloned()
            .expect("object");
        merge(&mut target, &patch);
        assert_eq!(
            Value::Object(target),
            serde_json::json!({"ttl": 30, "loop_wait": 5, "postgresql": {"parameters": {"a": 1, "c": 3}}})
        );
    }
}
