//! Self-signed certificates for test servers (S3 behind socat, pgBackRest's TLS server), made
//! with the `openssl` CLI.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

/// Writes `<dir>/<name>-cert.pem` and `<dir>/<name>-key.pem`: a self-signed certificate (its
/// own CA) with common name `cn` and subject alternative names `san` (openssl syntax, such as
/// `DNS:localhost,IP:127.0.0.1`). Returns (certificate, key).
pub fn self_signed(
    dir: &Path,
    name: &str,
    cn: &str,
    san: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let cert = dir.join(format!("{name}-cert.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args([
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            &format!("subjectAltName={san}"),
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("openssl runs")?;
    anyhow::ensure!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((cert, key))
}
