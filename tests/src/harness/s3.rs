//! An S3-compatible object store for the pgBackRest tests: `moto`'s server (from PyPI, installed
//! by `scripts/install-deps.sh` into [`MOTO_VENV`]) on a free loopback port, behind `socat` as
//! the TLS endpoint, with a self-signed certificate made by `openssl`.
//!
//! Why socat: pgBackRest speaks only HTTPS to S3, and moto's own TLS (Werkzeug's) closes each
//! connection without a TLS close_notify, which pgBackRest 2.45 (OpenSSL 3) reports as
//! "unexpected eof" and fails the request. socat shuts TLS down properly.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use super::ports::free_port;
use super::process::ProcessGuard;
use super::{http_request, wait_until};

/// Where `scripts/install-deps.sh` installs moto (outside the repository, kept between runs).
pub const MOTO_VENV: &str = "/var/cache/pgwarden/moto-venv";

/// The S3 endpoint and the two processes behind it; both stop (by PID) on drop.
pub struct S3Server {
    /// `https://127.0.0.1:<port>` is the endpoint pgBackRest talks to.
    pub tls_port: u16,
    /// moto's plain HTTP port (for setting up buckets from the test).
    pub http_port: u16,
    _moto: ProcessGuard,
    _tls: ProcessGuard,
}

impl S3Server {
    /// Starts moto and its TLS front in `dir` and waits until both answer.
    pub async fn start(dir: &Path) -> anyhow::Result<S3Server> {
        let moto = moto_binary()?;
        std::fs::create_dir_all(dir)?;
        let (cert, key) = super::tls::self_signed(dir, "s3", "127.0.0.1", "IP:127.0.0.1")?;
        let http_port = free_port();
        let tls_port = free_port();
        let mut cmd = Command::new(&moto);
        cmd.args(["-H", "127.0.0.1", "-p", &http_port.to_string()]);
        let moto = ProcessGuard::spawn("moto", cmd, &dir.join("moto.log"))?;
        let mut cmd = Command::new("socat");
        cmd.arg(format!(
            "OPENSSL-LISTEN:{tls_port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
            cert.display(),
            key.display()
        ))
        .arg(format!("TCP:127.0.0.1:{http_port}"));
        let tls = ProcessGuard::spawn("socat", cmd, &dir.join("socat.log"))?;
        let server = S3Server {
            tls_port,
            http_port,
            _moto: moto,
            _tls: tls,
        };
        wait_until("moto answers", Duration::from_secs(60), || async {
            http_request("GET", http_port, "/", None).await.is_some()
        })
        .await;
        Ok(server)
    }

    /// Creates a bucket (moto accepts unsigned requests).
    pub async fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        let (code, body) = http_request("PUT", self.http_port, &format!("/{name}"), None)
            .await
            .context("moto answers")?;
        anyhow::ensure!(code == 200, "create bucket {name}: {code} {body}");
        Ok(())
    }

    /// Object keys under `prefix` in `bucket` (ListObjectsV2, first page).
    pub async fn list(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let path = format!("/{bucket}?list-type=2&max-keys=1000&prefix={prefix}");
        let Some((200, body)) = http_request("GET", self.http_port, &path, None).await else {
            return Vec::new();
        };
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split_once("</Key>").map(|(k, _)| k.to_owned()))
            .collect()
    }
}

fn moto_binary() -> anyhow::Result<PathBuf> {
    let path = Path::new(MOTO_VENV).join("bin/moto_server");
    anyhow::ensure!(
        path.exists(),
        "{} is missing: scripts/install-deps.sh installs moto (PyPI) there",
        path.display()
    );
    Ok(path)
}
