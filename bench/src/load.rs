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

fn parse_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => return None,
    })
}

/// Parses `wrk --latency` output.
pub fn parse_wrk(output: &str) -> Option<LoadResult> {
    let per_second: f64 = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    let pct = |p: &str| {
        output
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .and_then(parse_duration_ms)
    };
    let requests = output
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Some(LoadResult {
        requests,
        errors: 0,
        per_second,
        p50_ms: pct("50%")?,
        p99_ms: pct("99%")?,
    })
}

/// Runs Debian's `wrk` (one thread, `connections` connections) when it is installed.
pub async fn run_wrk(
    port: u16,
    path: &str,
    connections: usize,
    duration: Duration,
) -> Option<LoadResult> {
    let out = tokio::process::Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{}s", duration.as_secs().max(1)),
            "--latency",
            &format!("http://127.0.0.1:{port}{path}"),
        ])
        .output()
        .await
        .ok()?;
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_parses() {
        let text = "Running 5s test @ http://127.0.0.1:8008/primary
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   128.88us  147.08us   4.30ms   99.00%
  Latency Distribution
     50%  113.00us
     75%  130.00us
     90%  160.00us
     99%  1.20ms
  335964 requests in 5.10s, 233.89MB read
Requests/sec:  65879.14
";
        let r = parse_wrk(text).expect("parses");
        assert_eq!(r.requests, 335964);
        assert!((r.per_second - 65879.14).abs() < 0.01);
        assert!((r.p50_ms - 0.113).abs() < 1e-9);
        assert!((r.p99_ms - 1.2).abs() < 1e-9);
    }
}
