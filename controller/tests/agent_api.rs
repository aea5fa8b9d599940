//! The switchover request the rollout sends, against a real TCP server that answers as an
//! agent does (Patroni's status codes and plain-text bodies).

use std::time::Duration;

use pgwarden_controller::agent_api::{self, AgentApiError, ApiCredentials};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves one request with `status`/`body` and returns the raw request text.
async fn one_shot(
    status: &'static str,
    body: &'static str,
) -> (String, tokio::task::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handle = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.expect("accept");
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        // Read headers and the small JSON body.
        loop {
            let n = sock.read(&mut buf).await.expect("read");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(idx) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if got.len() >= idx + 4 + len {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        let reply = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(reply.as_bytes()).await.expect("write");
        String::from_utf8_lossy(&got).to_string()
    });
    (format!("http://{addr}/patroni"), handle)
}

#[tokio::test]
async fn switchover_posts_leader_and_candidate_with_basic_auth() {
    let (url, server) = one_shot("200 OK", "Successfully switched over to \"pg-1\"").await;
    let creds = ApiCredentials {
        username: "pgwarden".to_owned(),
        password: "s3cret".to_owned(),
    };
    let answer = agent_api::switchover(&url, "pg-0", "pg-1", Some(&creds), Duration::from_secs(5))
        .await
        .expect("switchover");
    assert_eq!(answer, "Successfully switched over to \"pg-1\"");
    let request = server.await.expect("server");
    assert!(
        request.starts_with("POST /switchover HTTP/1.1\r\n"),
        "{request}"
    );
    // base64("pgwarden:s3cret")
    assert!(
        request.contains("authorization: Basic cGd3YXJkZW46czNjcmV0\r\n"),
        "{request}"
    );
    let body = &request[request.find("\r\n\r\n").expect("body") + 4..];
    let json: serde_json::Value = serde_json::from_str(body).expect("json body");
    assert_eq!(
        json,
        serde_json::json!({"leader": "pg-0", "candidate": "pg-1"})
    );
}

#[tokio::test]
async fn a_refused_switchover_is_an_error_with_the_agents_message() {
    let (url, server) = one_shot(
        "412 Precondition Failed",
        "candidate name does not match with sync_standby",
    )
    .await;
    let err = agent_api::switchover(&url, "pg-0", "pg-2", None, Duration::from_secs(5))
        .await
        .expect_err("refused");
    match err {
        AgentApiError::Refused { status, body, .. } => {
            assert_eq!(status, 412);
            assert_eq!(body, "candidate name does not match with sync_standby");
        }
        other => panic!("unexpected {other:?}"),
    }
    server.await.expect("server");
}

#[test]
fn only_http_api_urls_are_accepted() {
    assert_eq!(
        agent_api::authority("http://10.0.0.1:8008/patroni").expect("ok"),
        "10.0.0.1:8008"
    );
    assert!(matches!(
        agent_api::authority("https://10.0.0.1:8008/patroni"),
        Err(AgentApiError::Url(_))
    ));
    assert!(matches!(
        agent_api::authority("http:///patroni"),
        Err(AgentApiError::Url(_))
    ));
}
