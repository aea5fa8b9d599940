//! `pgwarden healthcheck [CONFIG]`: asks the local agent's REST API for `/liveness` and exits 0
//! when it answers 200, 1 otherwise. It is the container image's HEALTHCHECK, which has no curl;
//! the address comes from the same file and environment the agent reads, so the two agree.

use std::time::Duration;

use crate::config::Config;

/// Why the agent is not healthy.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The REST API did not answer (not listening, hung, TLS failure).
    #[error("no answer from {url}")]
    Unreachable {
        url: String,
        #[source]
        source: crate::peer::PeerError,
    },
    /// It answered, but not 200: the HA loop has not run within the allowed time.
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
}

/// The local URL of `/liveness`: the listen address, with a wildcard host replaced by loopback.
pub fn liveness_url(config: &Config) -> String {
    let listen = &config.restapi.listen;
    let (host, port) = match listen.rsplit_once(':') {
        Some((h, p)) => (h.trim_matches(['[', ']']), p),
        None => ("", listen.as_str()),
    };
    let host = match host {
        "" | "0.0.0.0" | "*" => "127.0.0.1".to_owned(),
        "::" => "[::1]".to_owned(),
        h if h.contains(':') => format!("[{h}]"),
        h => h.to_owned(),
    };
    let scheme = if config.restapi.certfile.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{host}:{port}/liveness")
}

/// GETs `url` once within `timeout`.
pub async fn check(url: &str, timeout: Duration) -> Result<(), HealthError> {
    match crate::peer::get(url, timeout).await {
        Ok((200, _)) => Ok(()),
        Ok((status, _)) => Err(HealthError::Status {
            url: url.to_owned(),
            status,
        }),
        Err(source) => Err(HealthError::Unreachable {
            url: url.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_listening_on(listen: &str) -> Config {
        let mut config = Config::default();
        config.restapi.listen = listen.to_owned();
        config
    }

    #[test]
    fn wildcard_listen_addresses_are_asked_on_loopback() {
        let url = |l: &str| liveness_url(&config_listening_on(l));
        assert_eq!(url("0.0.0.0:8008"), "http://127.0.0.1:8008/liveness");
        assert_eq!(url(":8008"), "http://127.0.0.1:8008/liveness");
        assert_eq!(url("[::]:8008"), "http://[::1]:8008/liveness");
        assert_eq!(url("10.1.2.3:8009"), "http://10.1.2.3:8009/liveness");
    }

    #[tokio::test]
    async fn a_non_200_answer_and_no_answer_are_both_unhealthy() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let server = tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut sock, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                let _ = sock.write_all(reply.as_bytes()).await;
            }
        });
        let url = format!("http://{addr}/liveness");
        let timeout = Duration::from_secs(5);
        assert!(check(&url, timeout).await.is_ok());
        assert!(matches!(
            check(&url, timeout).await,
            Err(HealthError::Status { status: 503, .. })
        ));
        server.await.expect("server task");
        // Nobody listens any more.
        assert!(matches!(
            check(&url, timeout).await,
            Err(HealthError::Unreachable { .. })
        ));
    }
}
