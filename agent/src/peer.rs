//! Calls to other members' REST APIs: `GET /patroni` during a leader race (Patroni asks every
//! peer, 2 s timeout, §5.5 step 12) and `GET /liveness` to refuse a duplicate member name.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// What a peer's `/patroni` says, as far as a leader race needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    /// `role` is primary (`primary` or `master`): the peer is not in recovery.
    pub is_primary: bool,
    /// max(received, replayed) on a standby; `location` on a primary.
    pub wal_position: u64,
    pub nofailover: bool,
    pub failover_priority: i64,
    pub watchdog_failed: bool,
    pub state: String,
}

/// Errors talking to a peer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("invalid URL {0}")]
    Url(String),
    #[error("request failed: {0}")]
    Request(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the answer is not Patroni status JSON: {0}")]
    Body(String),
}

/// GETs `url`, returning the status code and body.
pub async fn get(url: &str, timeout: Duration) -> Result<(u16, String), PeerError> {
    let uri: hyper::Uri = url.parse().map_err(|_| PeerError::Url(url.to_owned()))?;
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let work = async {
        let response = client
            .get(uri)
            .await
            .map_err(|e| PeerError::Request(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| PeerError::Request(e.to_string()))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| PeerError::Timeout(timeout))?
}

/// Sends `method url` with an optional JSON body and basic auth; returns status and body.
pub async fn request(
    method: &str,
    url: &str,
    body: Option<&serde_json::Value>,
    auth: Option<(&str, &str)>,
    timeout: Duration,
) -> Result<(u16, String), PeerError> {
    use base64::Engine;
    use http_body_util::Full;
    let uri: hyper::Uri = url.parse().map_err(|_| PeerError::Url(url.to_owned()))?;
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header(hyper::header::CONTENT_LENGTH, payload.len());
    if let Some((user, password)) = auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        builder = builder.header(hyper::header::AUTHORIZATION, format!("Basic {token}"));
    }
    let request = builder
        .body(Full::new(bytes::Bytes::from(payload)))
        .map_err(|e| PeerError::Request(e.to_string()))?;
    let work = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| PeerError::Request(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| PeerError::Request(e.to_string()))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| PeerError::Timeout(timeout))?
}

/// True when anything answers HTTP at `url` within `timeout`.
pub async fn probe_liveness(url: &str, timeout: Duration) -> bool {
    get(url, timeout).await.is_ok()
}

/// Parses a `/patroni` body. A body without `xlog` counts as unreachable, as in Patroni.
pub fn parse_status(name: &str, body: &str) -> Result<PeerStatus, PeerError> {
    let json: serde_json::Value =
        serde_json::from_str(body).map_err(|e| PeerError::Body(e.to_string()))?;
    let xlog = json
        .get("xlog")
        .ok_or_else(|| PeerError::Body("no `xlog` field".into()))?;
    let num = |v: Option<&serde_json::Value>| v.and_then(serde_json::Value::as_u64).unwrap_or(0);
    let role = json.get("role").and_then(|r| r.as_str()).unwrap_or("");
    let is_primary = matches!(role, "primary" | "master");
    let wal_position = if xlog.get("location").is_some() {
        num(xlog.get("location"))
    } else {
        num(xlog.get("received_location")).max(num(xlog.get("replayed_location")))
    };
    let tags = json.get("tags");
    let tag = |k: &str| tags.and_then(|t| t.get(k));
    let failover_priority = tag("failover_priority")
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(1);
    Ok(PeerStatus {
        name: name.to_owned(),
        is_primary,
        wal_position,
        nofailover: tag("nofailover").and_then(|v| v.as_bool()).unwrap_or(false)
            || failover_priority <= 0,
        failover_priority,
        watchdog_failed: json
            .get("watchdog_failed")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        state: json
            .get("state")
            .and_then(|s| s.as_str())
            .unwrap_or("")
            .to_owned(),
    })
}

/// Fetches and parses a peer's `/patroni`.
pub async fn fetch_status(
    name: &str,
    api_url: &str,
    timeout: Duration,
) -> Result<PeerStatus, PeerError> {
    let (_, body) = get(api_url, timeout).await?;
    parse_status(name, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standby_position_is_max_of_received_and_replayed() {
        let s = parse_status(
            "b",
            r#"{"role":"replica","state":"running","xlog":{"received_location":50,"replayed_location":40},"tags":{"nofailover":true}}"#,
        )
        .expect("parses");
        assert!(!s.is_primary);
        assert_eq!(s.wal_position, 50);
        assert!(s.nofailover);
    }

    #[test]
    fn primary_and_legacy_master_role_count_as_primary() {
        for role in ["primary", "master"] {
            let body = format!(r#"{{"role":"{role}","xlog":{{"location":7}}}}"#);
            let s = parse_status("a", &body).expect("parses");
            assert!(s.is_primary);
            assert_eq!(s.wal_position, 7);
        }
    }

    #[test]
    fn answer_without_xlog_is_unusable() {
        assert!(parse_status("a", r#"{"role":"replica"}"#).is_err());
    }
}
