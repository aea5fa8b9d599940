//! In-process tests of the REST API: status codes per path and method, JSON fields, malformed
//! requests, basic auth and metrics text.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::*;
use crate::dcs::{ClusterView, LeaderKey, LeaderStatus, Versioned};
use crate::ha::failsafe::Failsafe;
use crate::state::{PgState, PostgresStatus, Role};

struct NoProbe;

#[async_trait::async_trait]
impl LiveProbe for NoProbe {
    async fn postgres_now(&self) -> Option<PostgresStatus> {
        None
    }
}

fn pg(in_recovery: bool) -> PostgresStatus {
    PostgresStatus {
        in_recovery,
        server_version: 150018,
        timeline: Some(3),
        postmaster_start_time: Some("2026-11-24 00:00:00.000000+00:00".into()),
        postmaster_start_epoch: Some(1.5),
        wal_flush_lsn: (!in_recovery).then_some(5000),
        receive_lsn: in_recovery.then_some(4000),
        replay_lsn: in_recovery.then_some(3000),
        replayed_timestamp: None,
        replay_paused: false,
        streaming: in_recovery,
        system_identifier: Some("7310000000000000001".into()),
        replication: vec![],
        pending_restart: vec![],
        min_recovery: None,
        synchronous_standby_names: None,
    }
}

fn view(leader: &str) -> Arc<ClusterView> {
    Arc::new(ClusterView {
        leader: Some(LeaderKey {
            name: leader.into(),
            revision: 1,
            lease: 1,
        }),
        status: Some(LeaderStatus {
            optime: 5000,
            ..Default::default()
        }),
        config: Some(Versioned {
            value: serde_json::json!({"ttl": 30}),
            revision: 1,
        }),
        ..Default::default()
    })
}

fn primary() -> AgentStatus {
    let now = Instant::now();
    AgentStatus {
        scope: "batman".into(),
        name: "pg0".into(),
        state: PgState::Running,
        role: Role::Primary,
        postgres: Some(pg(false)),
        leader_valid_until: Some(now + Duration::from_secs(20)),
        cluster: Some(view("pg0")),
        cluster_read_at: Some(now),
        dcs_last_seen: Some(std::time::SystemTime::now()),
        paused: false,
        tags: Default::default(),
        pending_restart: false,
        database_system_identifier: Some("7310000000000000001".into()),
        next_cycle_due: now + Duration::from_secs(10),
        ttl: Duration::from_secs(30),
        loop_wait: Duration::from_secs(10),
        maximum_lag_on_failover: 1_048_576,
        postmaster_start_epoch: Some(1.5),
    }
}

fn replica() -> AgentStatus {
    AgentStatus {
        name: "pg1".into(),
        role: Role::Replica,
        postgres: Some(pg(true)),
        leader_valid_until: None,
        ..primary()
    }
}

async fn serve_status(
    status: AgentStatus,
    auth: Option<(String, String)>,
) -> (u16, mpsc::Receiver<ApiCommand>) {
    serve_with_failsafe(status, auth, Arc::new(Failsafe::new())).await
}

async fn serve_with_failsafe(
    status: AgentStatus,
    auth: Option<(String, String)>,
    failsafe: Arc<Failsafe>,
) -> (u16, mpsc::Receiver<ApiCommand>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (_tx, rx) = watch::channel(Arc::new(status));
    let (ctx_tx, ctx_rx) = mpsc::channel(4);
    let ctx = ApiContext {
        status: rx,
        probe: Arc::new(NoProbe),
        auth,
        commands: ctx_tx,
        backup: None,
        failsafe,
    };
    tokio::spawn(async move {
        let _keep = _tx;
        let _ = serve(listener, ctx, CancellationToken::new()).await;
    });
    (port, ctx_rx)
}

async fn raw(port: u16, request: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (code, head.to_owned(), body.to_owned())
}

async fn req(port: u16, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let request = match body {
        Some(b) => format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ),
        None => format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    };
    let (code, _, body) = raw(port, &request).await;
    (code, body)
}

#[tokio::test]
async fn primary_answers_health_checks_like_patroni() {
    let (port, _rx) = serve_status(primary(), None).await;
    for (path, want) in [
        ("/", 200),
        ("/primary", 200),
        ("/master", 200),
        ("/leader", 200),
        ("/read-write", 200),
        ("/replica", 503),
        ("/read-only", 200),
        ("/health", 200),
        ("/standby-leader", 503),
        ("/async", 503),
        ("/whatever", 503),
    ] {
        assert_eq!(req(port, "GET", path, None).await.0, want, "GET {path}");
    }
    let (code, body) = req(port, "GET", "/primary", None).await;
    assert_eq!(code, 200);
    let j: serde_json::Value = serde_json::from_str(&body).expect("json body");
    assert_eq!(j["role"], "primary");
    assert_eq!(j["xlog"]["location"], 5000);
    // OPTIONS/HEAD: status line only.
    let (code, _, body) = raw(
        port,
        "OPTIONS / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((code, body.as_str()), (200, ""));
    assert_eq!(req(port, "HEAD", "/replica", None).await.0, 503);
}

#[tokio::test]
async fn replica_health_respects_lag_and_tags() {
    let mut status = replica();
    status.tags.insert("zone".into(), serde_json::json!("a"));
    let (port, _rx) = serve_status(status, None).await;
    assert_eq!(req(port, "GET", "/primary", None).await.0, 503);
    assert_eq!(req(port, "GET", "/replica", None).await.0, 200);
    assert_eq!(
        req(port, "GET", "/replica?lag=2kB", None).await.0,
        200,
        "2000 bytes behind, 2048 allowed"
    );
    assert_eq!(
        req(port, "GET", "/replica?lag=1kB", None).await.0,
        503,
        "2000 bytes behind, 1024 allowed"
    );
    assert_eq!(req(port, "GET", "/replica?lag=100", None).await.0, 503);
    assert_eq!(req(port, "GET", "/replica?tag_zone=a", None).await.0, 200);
    assert_eq!(req(port, "GET", "/replica?tag_zone=b", None).await.0, 503);
    assert_eq!(req(port, "GET", "/async", None).await.0, 200);
    assert_eq!(req(port, "GET", "/readiness", None).await.0, 200);
    assert_eq!(req(port, "GET", "/readiness?lag=100", None).await.0, 503);
    let (_, body) = req(port, "GET", "/patroni", None).await;
    let j: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(j["xlog"]["received_location"], 4000);
    assert_eq!(j["xlog"]["replayed_location"], 3000);
    assert_eq!(j["replication_state"], "streaming");
    assert_eq!(j["patroni"]["version"], "4.1.4");
    assert_eq!(j["patroni"]["scope"], "batman");
}

#[tokio::test]
async fn liveness_and_readiness_have_no_body() {
    let (port, _rx) = serve_status(primary(), None).await;
    let (code, _, body) = raw(
        port,
        "GET /liveness HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((code, body.as_str()), (200, ""));
    let mut stuck = primary();
    stuck.next_cycle_due = Instant::now() - Duration::from_secs(120);
    let (port, _rx) = serve_status(stuck, None).await;
    assert_eq!(req(port, "GET", "/liveness", None).await.0, 503);
}

#[tokio::test]
async fn without_the_lock_a_running_primary_fails_primary_checks() {
    let mut s = primary();
    s.leader_valid_until = None;
    let (port, _rx) = serve_status(s, None).await;
    assert_eq!(req(port, "GET", "/primary", None).await.0, 503);
    assert_eq!(req(port, "GET", "/readiness", None).await.0, 503);
}

#[tokio::test]
async fn malformed_requests_get_a_4xx_with_a_message() {
    let (port, _rx) = serve_status(primary(), None).await;
    let (code, body) = req(port, "POST", "/switchover", Some("{not json")).await;
    assert_eq!(code, 400);
    assert!(body.contains("invalid JSON"), "{body}");
    let (code, _) = req(port, "POST", "/switchover", Some("[1,2]")).await;
    assert_eq!(code, 400);
    let (code, body) = req(port, "POST", "/switchover", None).await;
    assert_eq!(code, 411, "{body}");
    let (code, _) = req(port, "POST", "/nonsense", Some("{}")).await;
    assert_eq!(code, 501);
    let big = "x".repeat(MAX_BODY + 10);
    let (code, _) = req(port, "PATCH", "/config", Some(&big)).await;
    assert_eq!(code, 413);
}

#[tokio::test]
async fn write_endpoints_require_basic_auth_when_configured() {
    let (port, mut rx) = serve_status(primary(), Some(("admin".into(), "pw".into()))).await;
    let (code, body) = req(port, "POST", "/reload", None).await;
    assert_eq!((code, body.as_str()), (401, "no auth header received"));
    let request = "POST /reload HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Basic d3Jvbmc=\r\n\r\n";
    let (code, head, _) = raw(port, request).await;
    assert_eq!(code, 401);
    assert!(head.contains("Basic realm=\"Patroni\""));
    tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            let _ = cmd.reply.send(ApiReply::new(202, "reload scheduled"));
        }
    });
    let good = format!(
        "POST /reload HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Basic {}\r\n\r\n",
        base64::engine::general_purpose::STANDARD.encode("admin:pw")
    );
    let (code, _, body) = raw(port, &good).await;
    assert_eq!((code, body.as_str()), (202, "reload scheduled"));
}

#[tokio::test]
async fn metrics_use_patroni_names_and_labels() {
    let (port, _rx) = serve_status(primary(), None).await;
    let (code, body) = req(port, "GET", "/metrics", None).await;
    assert_eq!(code, 200);
    for line in [
        "patroni_primary{scope=\"batman\",name=\"pg0\"} 1",
        "patroni_replica{scope=\"batman\",name=\"pg0\"} 0",
        "patroni_postgres_running{scope=\"batman\",name=\"pg0\"} 1",
        "patroni_xlog_location{scope=\"batman\",name=\"pg0\"} 5000",
        "patroni_postgres_timeline{scope=\"batman\",name=\"pg0\"} 3",
        "patroni_cluster_unlocked{scope=\"batman\",name=\"pg0\"} 0",
        "patroni_version{scope=\"batman\",name=\"pg0\"} 40104",
        "patroni_postgres_server_version{scope=\"batman\",name=\"pg0\"} 150018",
    ] {
        assert!(body.contains(line), "missing {line} in\n{body}");
    }
    assert!(body.contains("# HELP patroni_primary "));
    assert!(body.contains("# TYPE patroni_primary gauge"));
    assert!(!body.contains("_total"));
    assert!(!body.contains("# EOF"));
}

#[tokio::test]
async fn cluster_document_lists_members_with_roles() {
    let (port, _rx) = serve_status(primary(), None).await;
    let (code, body) = req(port, "GET", "/cluster", None).await;
    assert_eq!(code, 200);
    let j: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(j["scope"], "batman");
    let (code, body) = req(port, "GET", "/config", None).await;
    assert_eq!((code, body.as_str()), (200, "{\"ttl\":30}"));
    assert_eq!(
        req(port, "GET", "/history", None).await,
        (200, "[]".to_owned())
    );
}

/// At the cap, the oldest connection with no request in progress makes room; one in a request
/// is never closed.
#[test]
fn the_oldest_idle_connection_makes_room() {
    use std::sync::atomic::AtomicUsize;
    let tracked = |in_flight: usize| Tracked {
        in_flight: Arc::new(AtomicUsize::new(in_flight)),
        close: CancellationToken::new(),
    };
    let mut open: BTreeMap<u64, Tracked> = [(1, tracked(1)), (2, tracked(0)), (3, tracked(0))]
        .into_iter()
        .collect();
    let second = open[&2].close.clone();
    assert!(close_oldest_idle(&mut open));
    assert!(second.is_cancelled());
    assert_eq!(open.keys().copied().collect::<Vec<_>>(), vec![1, 3]);
    assert!(close_oldest_idle(&mut open));
    assert!(
        !close_oldest_idle(&mut open),
        "only a busy connection is left"
    );
    assert!(!open[&1].close.is_cancelled());
}

/// A server with a cap of 16 connections and a short header timeout: idle connections beyond
/// the cap and a silent one past the timeout are closed, and a request still gets its answer.
#[tokio::test]
async fn idle_connections_beyond_the_cap_do_not_keep_a_request_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let shutdown = CancellationToken::new();
    let app = axum::Router::new().fallback(|| async { "ok" });
    let limits = ConnectionLimits {
        max_connections: 16,
        header_timeout: Duration::from_millis(300),
    };
    tokio::spawn(serve_connections(
        listener,
        app,
        None,
        shutdown.clone(),
        limits,
    ));
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        );
    }
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    client
        .write_all(b"GET /primary HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The first idle connection was closed to make room (or by the header timeout).
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut byte))
        .await
        .expect("closed in time");
    assert!(matches!(read, Ok(0) | Err(_)));
    shutdown.cancel();
}

/// Patroni §2.10: `POST /failsafe` is 502 without the mode, 400 without a sender, 500 on a
/// primary, and on a replica 200 `Accepted` with its position in `lsn`; the replica then
/// reports `failsafe_mode_is_active` and remembers the sender as the live leader.
#[tokio::test]
async fn failsafe_posts_are_accepted_by_replicas_only_while_the_mode_is_on() {
    let failsafe = Arc::new(Failsafe::new());
    let (port, _rx) = serve_with_failsafe(replica(), None, failsafe.clone()).await;
    let body = r#"{"name": "pg0", "conn_url": "postgres://a/postgres", "api_url": "http://a:8008/patroni", "slots": {"pg0": 100}}"#;
    let (code, _) = req(port, "POST", "/failsafe", Some(body)).await;
    assert_eq!(code, 502);
    failsafe.configure(true, std::time::Duration::from_secs(30));
    let (code, text) = req(port, "POST", "/failsafe", Some(r#"{"conn_url": "x"}"#)).await;
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("name"), "{text}");
    let request = format!(
        "POST /failsafe HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (code, head, text) = raw(port, &request).await;
    assert_eq!((code, text.as_str()), (200, "Accepted"), "{head}");
    assert!(head.to_ascii_lowercase().contains("\r\nlsn: "), "{head}");
    assert_eq!(
        failsafe.live_leader(std::time::Instant::now()).as_deref(),
        Some("pg0")
    );
    let (_, doc) = req(port, "GET", "/patroni", None).await;
    assert!(doc.contains("\"failsafe_mode_is_active\":true"), "{doc}");
    let (_, metrics) = req(port, "GET", "/metrics", None).await;
    let active = metrics
        .lines()
        .find(|l| l.starts_with("patroni_failsafe_mode_is_active{"))
        .unwrap_or_default();
    assert!(active.ends_with(" 1"), "{metrics}");
    assert!(
        metrics.contains("patroni_failsafe_mode_enabled{"),
        "{metrics}"
    );

    let primary_failsafe = Arc::new(Failsafe::new());
    primary_failsafe.configure(true, std::time::Duration::from_secs(30));
    let (port, _rx) = serve_with_failsafe(primary(), None, primary_failsafe).await;
    let (code, text) = req(port, "POST", "/failsafe", Some(body)).await;
    assert_eq!((code, text.as_str()), (500, "Running as a leader"));
}

/// `GET /failsafe` shows the topology last read from the DCS, 502 when there is none.
#[tokio::test]
async fn failsafe_topology_is_shown_when_published() {
    let (port, _rx) = serve_status(replica(), None).await;
    let (code, _) = req(port, "GET", "/failsafe", None).await;
    assert_eq!(code, 502);
    let mut status = replica();
    let mut view = (*view("pg0")).clone();
    view.failsafe = Some(
        [("pg0".to_string(), "http://a:8008/patroni".to_string())]
            .into_iter()
            .collect(),
    );
    status.cluster = Some(Arc::new(view));
    let (port, _rx) = serve_status(status, None).await;
    let (code, text) = req(port, "GET", "/failsafe", None).await;
    assert_eq!(code, 200);
    assert_eq!(text, r#"{"pg0":"http://a:8008/patroni"}"#);
}

/// Patroni §2.4: a streaming replica whose DCS view went stale is ready only while failsafe
/// mode is in force.
#[tokio::test]
async fn readiness_with_a_stale_view_depends_on_failsafe() {
    let mut status = replica();
    status.cluster_read_at = Some(Instant::now() - Duration::from_secs(120));
    let failsafe = Arc::new(Failsafe::new());
    let (port, _rx) = serve_with_failsafe(status, None, failsafe.clone()).await;
    let (code, _) = req(port, "GET", "/readiness", None).await;
    assert_eq!(code, 503);
    failsafe.configure(true, Duration::from_secs(30));
    failsafe.leader_alive("pg0", Instant::now(), None);
    let (code, _) = req(port, "GET", "/readiness", None).await;
    assert_eq!(code, 200);
}
