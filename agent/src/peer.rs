//! Calls to other members' REST APIs: `GET /patroni` during a leader race (Patroni asks every
//! peer, 2 s timeout, §5.5 step 12) and `GET /liveness` to refuse a duplicate member name.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls;

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
    /// The timeline it runs on (a standby: the one it receives), when it says.
    pub timeline: Option<u32>,
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

/// TLS settings for calls to other members' REST APIs, set once at start.
static CLIENT_TLS: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

/// Accepts any server certificate: used when no `restapi.cafile` is configured, as Patroni does
/// for calls between members without a CA.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn insecure_client() -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Verifies peers' certificates against `restapi.cafile` as webpki does, and also accepts a
/// certificate found in the file itself although webpki refuses it as an end entity: a
/// self-signed certificate from `openssl req -x509` is marked as a CA, and OpenSSL (curl,
/// patronictl, Patroni itself) trusts a certificate in its trust store as it is. Before this,
/// such a `cafile` failed every member-to-member check (switchovers refused with 412) without a
/// word. Its validity period (webpki checks it before the CA flag) and the host name in its
/// subjectAltName are still checked, and the handshake still proves the peer holds its key.
#[derive(Debug)]
struct CafileVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    pinned: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl rustls::client::danger::ServerCertVerifier for CafileVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verdict = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        match verdict {
            // webpki's untyped complaints about the certificate's form (a CA used as an end
            // entity, an X.509 v1 certificate); dates, issuer and name errors are typed.
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(_)))
                if self
                    .pinned
                    .iter()
                    .any(|c| c.as_ref() == end_entity.as_ref()) =>
            {
                let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&cert, server_name)?;
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The client configuration for `restapi.cafile`: an error says why the file cannot be used
/// (`validate-config` reports it under `restapi.cafile`).
pub fn cafile_client(path: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let mut pinned = Vec::new();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
    {
        let cert = cert.map_err(|e| format!("bad PEM certificate in {}: {e}", path.display()))?;
        roots
            .add(cert.clone())
            .map_err(|e| format!("unusable certificate in {}: {e}", path.display()))?;
        pinned.push(cert);
    }
    if pinned.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    let webpki =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| format!("cannot verify with {}: {e}", path.display()))?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CafileVerifier { webpki, pinned }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Configures calls to `https` peers: verify against `cafile` when given, else accept any
/// certificate.
pub fn configure_client_tls(cafile: Option<&std::path::Path>) -> Result<(), String> {
    let config = match cafile {
        None => insecure_client()?,
        Some(path) => cafile_client(path)?,
    };
    let _ = CLIENT_TLS.set(config);
    Ok(())
}

/// The last TLS failure with each peer (`host:port`): a failure is logged when it starts or its
/// reason changes, a recovery once, and not every check in between (a leader race asks every
/// peer; a broken `cafile` used to fail them all without a line in the log).
static TLS_FAILURES: std::sync::Mutex<BTreeMap<String, String>> =
    std::sync::Mutex::new(BTreeMap::new());

fn note_tls(peer: &str, failure: Option<&str>) {
    let Ok(mut failures) = TLS_FAILURES.lock() else {
        return;
    };
    match failure {
        Some(reason) => {
            if failures.get(peer).map(String::as_str) != Some(reason) {
                tracing::warn!(peer, %reason, "TLS with a member's REST API fails");
                failures.insert(peer.to_owned(), reason.to_owned());
            }
        }
        None => {
            if failures.remove(peer).is_some() {
                tracing::info!(peer, "TLS with the member's REST API works again");
            }
        }
    }
}

/// A TLS error with what to check, for the log and the caller.
fn explain_tls(error: &std::io::Error, host: &str) -> String {
    let hint = match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            rustls::CertificateError::UnknownIssuer => {
                " (the certificate is not signed by a CA in restapi.cafile)"
            }
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. } => {
                " (its subjectAltName does not name the host; the common name is not used)"
            }
            // webpki's error is untyped here; the text is only for the hint.
            other if format!("{other:?}").contains("CaUsedAsEndEntity") => {
                " (a certificate marked as a CA, such as a self-signed one, that is not itself \
                 in restapi.cafile)"
            }
            _ => "",
        },
        _ => "",
    };
    format!("TLS with {host}: {error}{hint}")
}

async fn exchange<S>(
    io: S,
    request: hyper::Request<Full<bytes::Bytes>>,
) -> Result<(u16, String), PeerError>
where
    S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| PeerError::Request(e.to_string()))?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
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
}

/// Sends `method url` with an optional JSON body and basic auth; returns status and body.
/// One connection per request (members answer HTTP/1.0-style clients too); `https` URLs go
/// through TLS as configured by [`configure_client_tls`].
pub async fn request(
    method: &str,
    url: &str,
    body: Option<&serde_json::Value>,
    auth: Option<(&str, &str)>,
    timeout: Duration,
) -> Result<(u16, String), PeerError> {
    use base64::Engine;
    let uri: hyper::Uri = url.parse().map_err(|_| PeerError::Url(url.to_owned()))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri
        .host()
        .ok_or_else(|| PeerError::Url(url.to_owned()))?
        .trim_matches(['[', ']'])
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| host.clone());
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_LENGTH, payload.len());
    if let Some((user, password)) = auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        builder = builder.header(hyper::header::AUTHORIZATION, format!("Basic {token}"));
    }
    let request = builder
        .body(Full::new(bytes::Bytes::from(payload)))
        .map_err(|e| PeerError::Request(e.to_string()))?;
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| PeerError::Request(e.to_string()))?;
        if https {
            let config = match CLIENT_TLS.get() {
                Some(c) => c.clone(),
                None => insecure_client().map_err(PeerError::Request)?,
            };
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| PeerError::Url(url.to_owned()))?;
            let peer = format!("{host}:{port}");
            let tls = match tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
            {
                Ok(tls) => {
                    note_tls(&peer, None);
                    tls
                }
                Err(e) => {
                    let reason = explain_tls(&e, &peer);
                    note_tls(&peer, Some(&reason));
                    return Err(PeerError::Request(reason));
                }
            };
            exchange(TokioIo::new(tls), request).await
        } else {
            exchange(TokioIo::new(tcp), request).await
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| PeerError::Timeout(timeout))?
}

/// Another endpoint of the member whose API is at `api_url` (`http://h:8008/patroni` →
/// `http://h:8008/<endpoint>`), as Patroni's `get_endpoint_url`.
pub fn endpoint_url(api_url: &str, endpoint: &str) -> String {
    let (scheme, rest) = api_url.split_once("://").unwrap_or(("http", api_url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    format!("{scheme}://{authority}/{endpoint}")
}

/// GETs `url`, returning the status code and body.
pub async fn get(url: &str, timeout: Duration) -> Result<(u16, String), PeerError> {
    request("GET", url, None, None, timeout).await
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
    // Patroni publishes tags as written: `"1"` and `"true"` count as 1 and true.
    let failover_priority = tag("failover_priority")
        .and_then(crate::config::flex::parse_int)
        .unwrap_or(1);
    Ok(PeerStatus {
        name: name.to_owned(),
        is_primary,
        wal_position,
        nofailover: tag("nofailover")
            .and_then(crate::config::flex::parse_bool)
            .unwrap_or(false)
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
        timeline: json
            .get("timeline")
            .and_then(serde_json::Value::as_u64)
            .and_then(|t| u32::try_from(t).ok()),
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
    fn endpoint_urls_keep_scheme_and_authority() {
        assert_eq!(
            endpoint_url("http://10.0.0.1:8008/patroni", "failsafe"),
            "http://10.0.0.1:8008/failsafe"
        );
        assert_eq!(
            endpoint_url("https://[::1]:8443", "failsafe"),
            "https://[::1]:8443/failsafe"
        );
    }

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
    fn a_cafile_without_certificates_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let why = cafile_client(&empty).expect_err("refused");
        assert!(why.contains("holds no PEM certificate"), "{why}");
        assert!(cafile_client(&dir.path().join("missing.pem")).is_err());
    }

    #[test]
    fn a_tls_failure_is_logged_once_per_reason() {
        note_tls("10.0.0.9:8008", Some("TLS with 10.0.0.9:8008: bad"));
        note_tls("10.0.0.9:8008", Some("TLS with 10.0.0.9:8008: bad"));
        let failures = || {
            TLS_FAILURES
                .lock()
                .expect("lock")
                .get("10.0.0.9:8008")
                .cloned()
        };
        assert_eq!(failures().as_deref(), Some("TLS with 10.0.0.9:8008: bad"));
        note_tls("10.0.0.9:8008", None);
        assert_eq!(failures(), None);
    }

    #[test]
    fn answer_without_xlog_is_unusable() {
        assert!(parse_status("a", r#"{"role":"replica"}"#).is_err());
    }
}
