//! Calls to an agent's REST API (Patroni's endpoints): `POST /switchover` on the primary
//! during a rollout, `POST /backup` on the leader for an on-demand backup and `GET /patroni`
//! to follow it. Plain HTTP: the controller renders the
//! agents' configuration without TLS on the API; the write endpoint is protected by basic auth
//! with the credentials from the cluster's `-restapi` Secret.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Failures of one API call.
#[derive(Debug, thiserror::Error)]
pub enum AgentApiError {
    /// The member's `api_url` is not `http://host:port/...`.
    #[error("cannot call {0:?}: only http://host:port URLs are supported")]
    Url(String),
    /// Connecting or the HTTP exchange failed.
    #[error("request to {url} failed")]
    Request {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("no answer from {0} within {1:?}")]
    Timeout(String, Duration),
    /// The agent refused (Patroni's status codes: 412 not ready, 503 failed, ...).
    #[error("{url} answered {status}: {body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
}

/// `host:port` of an agent from its `api_url` (`http://10.0.0.1:8008/patroni`).
pub fn authority(api_url: &str) -> Result<String, AgentApiError> {
    let rest = api_url
        .strip_prefix("http://")
        .ok_or_else(|| AgentApiError::Url(api_url.to_owned()))?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || !authority.contains(':') {
        return Err(AgentApiError::Url(api_url.to_owned()));
    }
    Ok(authority.to_owned())
}

/// Basic-auth credentials of the agents' write endpoints.
#[derive(Debug, Clone)]
pub struct ApiCredentials {
    pub username: String,
    pub password: String,
}

/// Asks the primary to hand over to `candidate` now (Patroni's planned switchover). Returns
/// when the agent answered: 200 means the new leader took over.
pub async fn switchover(
    api_url: &str,
    primary: &str,
    candidate: &str,
    credentials: Option<&ApiCredentials>,
    timeout: Duration,
) -> Result<String, AgentApiError> {
    let body = serde_json::json!({"leader": primary, "candidate": candidate}).to_string();
    post(api_url, "/switchover", body, credentials, timeout).await
}

/// Asks the leader for a backup of `kind` (`full`, `diff`, `incr`; `None`: the agent's
/// default) into repository number `repo` (`None`: repo1). The agent answers 202 with
/// `{"type", "repo", "member", "started_at"}`.
pub async fn backup(
    api_url: &str,
    kind: Option<&str>,
    repo: Option<u32>,
    credentials: Option<&ApiCredentials>,
    timeout: Duration,
) -> Result<String, AgentApiError> {
    let mut body = serde_json::json!({});
    if let Some(k) = kind {
        body["type"] = serde_json::json!(k);
    }
    if let Some(n) = repo {
        body["repo"] = serde_json::json!(n);
    }
    request(
        "POST",
        api_url,
        "/backup",
        body.to_string(),
        credentials,
        timeout,
    )
    .await
}

/// `GET /patroni` of a member (no credentials needed).
pub async fn patroni(api_url: &str, timeout: Duration) -> Result<String, AgentApiError> {
    request("GET", api_url, "/patroni", String::new(), None, timeout).await
}

/// `GET /backups`: `pgbackrest info --output=json` of the member's stanza.
pub async fn backups(api_url: &str, timeout: Duration) -> Result<String, AgentApiError> {
    request("GET", api_url, "/backups", String::new(), None, timeout).await
}

async fn post(
    api_url: &str,
    path: &str,
    body: String,
    credentials: Option<&ApiCredentials>,
    timeout: Duration,
) -> Result<String, AgentApiError> {
    request("POST", api_url, path, body, credentials, timeout).await
}

/// One exchange; any 2xx answer is a success (`POST /backup` answers 202).
async fn request(
    method: &str,
    api_url: &str,
    path: &str,
    body: String,
    credentials: Option<&ApiCredentials>,
    timeout: Duration,
) -> Result<String, AgentApiError> {
    let authority = authority(api_url)?;
    let url = format!("http://{authority}{path}");
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(&authority).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(c) = credentials {
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", c.username, c.password));
            request = request.header(hyper::header::AUTHORIZATION, format!("Basic {token}"));
        }
        let response = sender
            .send_request(request.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
            status,
            String::from_utf8_lossy(&body).trim().to_owned(),
        ))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err(AgentApiError::Timeout(url, timeout)),
        Ok(Err(source)) => Err(AgentApiError::Request { url, source }),
        Ok(Ok((status, body))) if (200..300).contains(&status) => Ok(body),
        Ok(Ok((status, body))) => Err(AgentApiError::Refused { url, status, body }),
    }
}
