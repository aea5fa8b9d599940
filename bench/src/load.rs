//! A small HTTP load generator: `connections` workers send `GET path` for `duration`, reusing
//! the connection when the server keeps it alive (pgwarden) and reconnecting when it closes it
//! (Patroni answers HTTP/1.0-style and closes).

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Result of one load run (`requests`, `errors` and `p50_ms` are logged).
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

async fn one(stream: &mut Option<BufReader<TcpStream>>, port: u16, path: &str) -> Option<u16> {
    if stream.is_none() {
        let s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let _ = s.set_nodelay(true);
        *stream = Some(BufReader::new(s));
    }
    let s = stream.as_mut()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    if s.get_mut().write_all(request.as_bytes()).await.is_err() {
        *stream = None;
        return None;
    }
    let mut status_line = String::new();
    if s.read_line(&mut status_line).await.ok()? == 0 {
        *stream = None;
        return None;
    }
    let status: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let mut length: Option<usize> = None;
    let mut close = status_line.starts_with("HTTP/1.0");
    loop {
        let mut line = String::new();
        if s.read_line(&mut line).await.ok()? == 0 {
            break;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let lower = l.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().ok();
        }
        if lower.starts_with("connection:") && lower.contains("close") {
            close = true;
        }
    }
    match length {
        Some(n) => {
            let mut body = vec![0u8; n];
            s.read_exact(&mut body).await.ok()?;
        }
        None => {
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            close = true;
        }
    }
    if close {
        *stream = None;
    }
    Some(status)
}

/// Runs the load and reports throughput and latency percentiles.
pub async fn run(port: u16, path: &str, connections: usize, duration: Duration) -> LoadResult {
    let deadline = Instant::now() + duration;
    let workers = (0..connections).map(|_| {
        let path = path.to_owned();
        tokio::spawn(async move {
            let mut stream = None;
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                match one(&mut stream, port, &path).await {
                    Some(_) => latencies.push(t.elapsed()),
                    None => errors += 1,
                }
            }
            (latencies, errors)
        })
    });
    let started = Instant::now();
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        if let Ok((l, e)) = w.await {
            all.extend(l);
            errors += e;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        if all.is_empty() {
            0.0
        } else {
            let i = ((all.len() as f64 - 1.0) * p).round() as usize;
            all[i.min(all.len() - 1)].as_secs_f64() * 1000.0
        }
    };
    LoadResult {
        requests: all.len() as u64,
        errors,
        per_second: all.len() as f64 / elapsed.max(0.001),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    }
}
