//! The REST API: Patroni's endpoints, status codes and JSON (`patroni-compat.md` §2), and
//! `/metrics`.
//!
//! One handler dispatches by method and first path segment, because Patroni routes every
//! unknown GET path to a health check by substring. Reads are answered from the status the HA
//! loop publishes (no SQL, so health checks are cheap), except `/patroni`, which asks postgres
//! for a fresh status: peers compare WAL positions from it during a leader race. Write requests
//! are forwarded to the agent as [`ApiCommand`]s.
//!
//! Modules: [`health`] (health-check, liveness and readiness rules), [`status`] (`/patroni`,
//! `/cluster`, `/history` documents), [`metrics`] (`/metrics`).

pub mod commands;
pub mod health;
pub mod metrics;
pub mod status;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub use metrics::render_metrics;

use crate::state::{AgentStatus, LiveProbe};

/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;

/// What the API needs from the agent.
#[derive(Clone)]
pub struct ApiContext {
    pub status: watch::Receiver<Arc<AgentStatus>>,
    pub probe: Arc<dyn LiveProbe>,
    /// `restapi.authentication` for the write endpoints.
    pub auth: Option<(String, String)>,
    pub commands: mpsc::Sender<ApiCommand>,
    /// The pgBackRest service, when configured (`POST /backup`, `GET /backups`).
    pub backup: Option<crate::backup::BackupHandle>,
    /// Failsafe mode's state, shared with the HA loop (`POST /failsafe`).
    pub failsafe: Arc<crate::ha::failsafe::Failsafe>,
}

/// A write request for the agent, with the channel to answer on.
#[derive(Debug)]
pub struct ApiCommand {
    pub method: Method,
    /// The path without query, e.g. `/switchover`.
    pub path: String,
    /// The parsed JSON body (`{}` when the request had none).
    pub body: serde_json::Map<String, serde_json::Value>,
    pub reply: oneshot::Sender<ApiReply>,
}

/// The agent's answer: a status code and a plain-text (or JSON) body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiReply {
    pub status: u16,
    pub body: String,
}

impl ApiReply {
    pub fn new(status: u16, body: impl Into<String>) -> Self {
        ApiReply {
            status,
            body: body.into(),
        }
    }
}

/// Answers a command nobody implements (used by agents without that feature).
pub fn answer_unhandled(command: ApiCommand) {
    let _ = command.reply.send(ApiReply::new(
        503,
        format!(
            "{} {} is not supported by this agent",
            command.method, command.path
        ),
    ));
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: ApiContext,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_connections(
        listener,
        router(ctx),
        None,
        shutdown,
        ConnectionLimits::for_process(),
    )
    .await
}

/// Loads the server certificate chain and key (PEM) for `restapi.certfile`/`keyfile`.
pub fn server_tls(
    certfile: &std::path::Path,
    keyfile: &std::path::Path,
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(certfile)
        .map_err(|e| format!("cannot read {}: {e}", certfile.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate in {}: {e}", certfile.display()))?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(keyfile)
        .map_err(|e| format!("cannot read the key {}: {e}", keyfile.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("certificate and key do not match: {e}"))?;
    Ok(Arc::new(config))
}

/// Serves over TLS until `shutdown` is cancelled.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    ctx: ApiContext,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    serve_connections(
        listener,
        router(ctx),
        Some(acceptor),
        shutdown,
        ConnectionLimits::for_process(),
    )
    .await
}

/// Bounds on the REST server's connections. Health checks (HAProxy, Kubernetes probes) open a
/// connection per check: without these, ~20,000 idle connections used up the agent's file
/// descriptors and `GET /primary` went unanswered for 50 s, taking the primary out of every
/// pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once. A new connection beyond it closes the oldest idle one (no
    /// request in progress), so a health check always gets in; when every connection is in a
    /// request, the new one is closed instead.
    pub max_connections: usize,
    /// Time a connection has to complete the TLS handshake and each request's header, counted
    /// from its opening or from its previous response: this is also its idle timeout.
    pub header_timeout: Duration,
}

impl ConnectionLimits {
    /// Most connections ever kept open: far above what health checks, peers and scrapers use.
    const MAX: usize = 1000;

    /// [`Self::MAX`] connections, or half of the file descriptors this process may open when
    /// that is less (the other half is for etcd, postgres and the files).
    pub fn for_process() -> Self {
        let descriptors =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(soft, _)| usize::try_from(soft).unwrap_or(usize::MAX))
                .unwrap_or(1024);
        ConnectionLimits {
            max_connections: (descriptors / 2).clamp(16, Self::MAX),
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit (systemd's defaults are
/// 1024 and 524288): the REST server's connection cap follows it.
pub fn raise_descriptor_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!(error = %e, soft, hard, "cannot raise the open files limit");
            }
        }
    }
}

/// An open connection, as the accept loop sees it.
struct Tracked {
    /// Requests in progress on it: 0 means idle, and so the first to go when the cap is hit.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    close: CancellationToken,
}

type OpenConnections = Arc<std::sync::Mutex<BTreeMap<u64, Tracked>>>;

/// Closes the oldest connection with no request in progress; false when there is none.
fn close_oldest_idle(open: &mut BTreeMap<u64, Tracked>) -> bool {
    use std::sync::atomic::Ordering;
    let idle = open
        .iter()
        .find(|(_, t)| t.in_flight.load(Ordering::Acquire) == 0)
        .map(|(id, _)| *id);
    match idle.and_then(|id| open.remove(&id)) {
        Some(t) => {
            t.close.cancel();
            true
        }
        None => false,
    }
}

/// Counts a request as in progress for as long as it lives.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn enter(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The accept loop of both servers: HTTP/1.1 (what Patroni serves) with a header timeout and
/// a connection cap, TLS when `tls` is given.
pub async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
    limits: ConnectionLimits,
) -> std::io::Result<()> {
    let open: OpenConnections = Arc::default();
    let mut next_id: u64 = 0;
    let mut refused_since_log: u64 = 0;
    let mut last_refusal_log: Option<Instant> = None;
    loop {
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors (EMFILE) or a connection reset before it was
                    // accepted: make room and try again shortly rather than spin.
                    tracing::debug!(error = %e, "accept failed");
                    if let Ok(mut open) = open.lock() {
                        close_oldest_idle(&mut open);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let id = next_id;
        next_id += 1;
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let close = shutdown.child_token();
        {
            let Ok(mut open) = open.lock() else {
                return Err(std::io::Error::other("the connection table is poisoned"));
            };
            if open.len() >= limits.max_connections && !close_oldest_idle(&mut open) {
                drop(tcp);
                refused_since_log += 1;
                // A flood must not flood the log as well: one line per minute at most.
                if last_refusal_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    tracing::warn!(
                        max = limits.max_connections,
                        refused = refused_since_log,
                        "REST API: every connection is busy with a request; refusing new ones"
                    );
                    last_refusal_log = Some(Instant::now());
                    refused_since_log = 0;
                }
                continue;
            }
            open.insert(
                id,
                Tracked {
                    in_flight: in_flight.clone(),
                    close: close.clone(),
                },
            );
        }
        let open = open.clone();
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = close.cancelled() => {}
                _ = serve_connection(tcp, tls, app, in_flight, limits.header_timeout) => {}
            }
            if let Ok(mut open) = open.lock() {
                open.remove(&id);
            }
        });
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    header_timeout: Duration,
) {
    let app = hyper_util::service::TowerToHyperService::new(app);
    let service = hyper::service::service_fn(move |request| {
        let guard = InFlight::enter(&in_flight);
        let response = hyper::service::Service::call(&app, request);
        async move {
            let response = response.await;
            drop(guard);
            response
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    match tls {
        Some(acceptor) => {
            let Ok(Ok(stream)) = tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await
            else {
                return;
            };
            let _ = http
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        }
        None => {
            let _ = http
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
        }
    }
}

/// The router (exposed for in-process tests).
pub fn router(ctx: ApiContext) -> Router {
    Router::new().fallback(handle).with_state(Arc::new(ctx))
}

fn text(status: u16, body: impl Into<String>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

fn json(status: u16, value: &serde_json::Value) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn status_only(status: u16) -> Response {
    StatusCode::from_u16(status)
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        .into_response()
}

fn query_map(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Basic auth for the write endpoints (§2.2): 401 with Patroni's messages.
fn check_auth(ctx: &ApiContext, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some((user, password)) = &ctx.auth else {
        return Ok(());
    };
    let unauthorized = |msg: &str| {
        let mut r = text(401, msg);
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"Patroni\""),
        );
        r
    };
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(Box::new(unauthorized("no auth header received")));
    };
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    );
    if value.as_bytes() == expected.as_bytes() {
        Ok(())
    } else {
        Err(Box::new(unauthorized("not authenticated")))
    }
}

/// Endpoints that change something, by method and path.
fn is_write(method: &Method, path: &str) -> bool {
    matches!(
        (method.as_str(), path),
        ("PATCH", "/config")
            | ("PUT", "/config")
            | ("POST", "/reload")
            | ("POST", "/restart")
            | ("DELETE", "/restart")
            | ("POST", "/reinitialize")
            | ("POST", "/switchover")
            | ("DELETE", "/switchover")
            | ("POST", "/failover")
            | ("POST", "/backup")
            | ("POST", "/failsafe")
    )
}

/// Write endpoints that cannot work without a JSON body.
fn needs_body(method: &Method, path: &str) -> bool {
    matches!(
        (method.as_str(), path),
        ("PATCH", "/config")
            | ("PUT", "/config")
            | ("POST", "/switchover")
            | ("POST", "/failover")
            | ("POST", "/failsafe")
    )
}

async fn handle(State(ctx): State<Arc<ApiContext>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = query_map(request.uri().query());
    let now = Instant::now();
    let status = ctx.status.borrow().clone();
    match method {
        Method::GET => get(&ctx, &status, &path, &query, now).await,
        Method::HEAD | Method::OPTIONS => status_only(health::evaluate(
            health::classify(&path),
            &status,
            &query,
            now,
        )),
        _ if is_write(&method, &path) => {
            if let Err(denied) = check_auth(&ctx, request.headers()) {
                return *denied;
            }
            let has_length = request.headers().contains_key(header::CONTENT_LENGTH)
                || request.headers().contains_key(header::TRANSFER_ENCODING);
            if needs_body(&method, &path) && !has_length {
                return text(411, "a request body with Content-Length is required");
            }
            let bytes = match to_bytes(request.into_body(), MAX_BODY).await {
                Ok(b) => b,
                Err(_) => return text(413, "request body too large or unreadable"),
            };
            let body = if bytes.iter().all(u8::is_ascii_whitespace) {
                if needs_body(&method, &path) {
                    return text(400, "a JSON object body is required");
                }
                serde_json::Map::new()
            } else {
                match serde_json::from_slice::<serde_json::Value>(&bytes) {
                    Ok(serde_json::Value::Object(map)) => map,
                    Ok(_) => return text(400, "the body must be a JSON object"),
                    Err(e) => return text(400, format!("invalid JSON body: {e}")),
                }
            };
            if path == "/failsafe" {
                return accept_failsafe(&ctx, &status, body).await;
            }
            if path == "/backup" {
                return match &ctx.backup {
                    Some(b) => {
                        let r = b.start(&body).await;
                        text(r.status, r.body)
                    }
                    None => text(503, "pgBackRest is not configured on this member"),
                };
            }
            forward(&ctx, method, path, body).await
        }
        _ => text(501, format!("unsupported method {method} for {path}")),
    }
}

async fn forward(
    ctx: &ApiContext,
    method: Method,
    path: String,
    body: serde_json::Map<String, serde_json::Value>,
) -> Response {
    let (reply, rx) = oneshot::channel();
    let command = ApiCommand {
        method,
        path,
        body,
        reply,
    };
    if ctx.commands.send(command).await.is_err() {
        return text(503, "the agent is shutting down");
    }
    match rx.await {
        Ok(r) => text(r.status, r.body),
        Err(_) => text(503, "the agent did not answer"),
    }
}

/// `POST /failsafe` (patroni-compat.md §2.10): a replica takes the sender for the live leader
/// for `ttl`; a member running as primary refuses. Its role is asked of postgres itself, not
/// of the last published status: a replica that has just been promoted must not vouch for
/// another primary.
async fn accept_failsafe(
    ctx: &ApiContext,
    status: &AgentStatus,
    body: serde_json::Map<String, serde_json::Value>,
) -> Response {
    if !ctx.failsafe.enabled() {
        return text(502, "failsafe_mode is not enabled");
    }
    let request: crate::ha::failsafe::FailsafeRequest =
        match serde_json::from_value(serde_json::Value::Object(body)) {
            Ok(r) => r,
            Err(e) => return text(400, format!("invalid failsafe request: {e}")),
        };
    let fresh = tokio::time::timeout(Duration::from_secs(1), ctx.probe.postgres_now())
        .await
        .ok()
        .flatten();
    let pg = fresh.as_ref().or(status.postgres.as_ref());
    if status.role == crate::state::Role::Primary || pg.is_some_and(|p| !p.in_recovery) {
        return text(500, "Running as a leader");
    }
    ctx.failsafe.leader_alive(
        &request.name,
        Instant::now(),
        request.ttl.map(Duration::from_secs),
    );
    let lsn = pg.and_then(|p| p.wal_position()).unwrap_or(0);
    let mut response = text(200, "Accepted");
    if let Ok(value) = header::HeaderValue::from_str(&lsn.to_string()) {
        response.headers_mut().insert("lsn", value);
    }
    response
}

/// `failsafe_mode_is_active` in the status JSON, as Patroni adds it only while active.
fn mark_failsafe(ctx: &ApiContext, doc: &mut serde_json::Value, now: Instant) {
    if ctx.failsafe.is_active(now) {
        if let Some(o) = doc.as_object_mut() {
            o.insert(
                "failsafe_mode_is_active".into(),
                serde_json::Value::Bool(true),
            );
        }
    }
}

async fn get(
    ctx: &ApiContext,
    status: &AgentStatus,
    path: &str,
    query: &BTreeMap<String, String>,
    now: Instant,
) -> Response {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    match first {
        "patroni" => {
            let fresh = tokio::time::timeout(Duration::from_secs(1), ctx.probe.postgres_now())
                .await
                .ok()
                .flatten();
            let pg = fresh.as_ref().or(status.postgres.as_ref());
            let mut doc = status::patroni_json(status, pg, now);
            mark_failsafe(ctx, &mut doc, now);
            if let (Some(b), Some(o)) = (&ctx.backup, doc.as_object_mut()) {
                o.insert("pgbackrest".into(), b.patroni_json());
            }
            json(200, &doc)
        }
        "backups" => match &ctx.backup {
            Some(b) => {
                let r = b.info().await;
                if r.status == 200 {
                    (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "application/json")],
                        r.body,
                    )
                        .into_response()
                } else {
                    text(r.status, r.body)
                }
            }
            None => text(503, "pgBackRest is not configured on this member"),
        },
        "liveness" => status_only(health::liveness(status, now)),
        "readiness" => status_only(health::readiness(
            status,
            query,
            ctx.failsafe.is_active(now),
            now,
        )),
        "metrics" => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            render_metrics(
                status,
                ctx.failsafe.is_active(now),
                ctx.failsafe.enabled(),
                now,
            ) + &ctx.backup.as_ref().map(|b| b.metrics()).unwrap_or_default(),
        )
            .into_response(),
        "cluster" => match status.cluster.as_deref() {
            Some(view) => json(200, &status::cluster_json(&status.scope, view)),
            None => json(
                200,
                &serde_json::json!({"members": [], "scope": status.scope}),
            ),
        },
        "history" => match status.cluster.as_deref() {
            Some(view) => json(200, &status::history_json(view)),
            None => json(200, &serde_json::json!([])),
        },
        "failsafe" => match status.cluster.as_deref().and_then(|v| v.failsafe.as_ref()) {
            Some(topology) => json(200, &serde_json::json!(topology)),
            None => text(502, "no failsafe topology has been published in the DCS"),
        },
        "config" => match status.cluster.as_deref().and_then(|v| v.config.as_ref()) {
            Some(c) => json(200, &c.value),
            None => text(502, "the cluster has no configuration in the DCS"),
        },
        _ => {
            let code = health::evaluate(health::classify(path), status, query, now);
            let mut doc = status::patroni_json(status, status.postgres.as_ref(), now);
            mark_failsafe(ctx, &mut doc, now);
            json(code, &doc)
        }
    }
}

#[cfg(test)]
mod tests;
