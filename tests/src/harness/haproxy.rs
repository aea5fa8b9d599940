//! A real HAProxy (Debian's `haproxy`) in front of a cluster, from a shipped configuration file
//! with its addresses rewritten to loopback ports: every `bind` gets a free port, and the
//! `server` lines of each section are replaced by one per member (postgres port as the address,
//! REST API port as `check port`), keeping the first template line's options.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::ports::free_port;
use super::process::ProcessGuard;

/// Where one member is: its postgres port and its REST API port.
#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
}

/// The shipped configuration (deploy/haproxy/haproxy.cfg).
pub fn shipped_config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/haproxy/haproxy.cfg")
}

/// Patroni's stock example (Debian's `patroni` package ships it); the same text when absent.
pub fn patroni_stock_config() -> String {
    std::fs::read_to_string("/usr/share/doc/patroni/examples/haproxy.cfg")
        .unwrap_or_else(|_| PATRONI_STOCK.to_owned())
}

/// The settings of Patroni's `haproxy.cfg` example, for a machine without the patroni package.
const PATRONI_STOCK: &str = "global
    maxconn 100

defaults
    log global
    mode tcp
    retries 2
    timeout client 30m
    timeout connect 4s
    timeout server 30m
    timeout check 5s

listen batman
    bind *:5000
    option httpchk
    http-check expect status 200
    default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions
    server postgresql_127.0.0.1_5432 127.0.0.1:5432 maxconn 100 check port 8008
";

/// The HAProxy binary, or `None` when it is not installed.
pub fn binary() -> Option<PathBuf> {
    ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// `template` with every `bind` on a free loopback port (returned by section name) and the
/// `server` lines of each section replaced by one per backend.
pub fn render(template: &str, backends: &[Backend]) -> (String, BTreeMap<String, u16>) {
    let mut out = String::new();
    let mut ports = BTreeMap::new();
    let mut section = String::new();
    let mut servers_done = false;
    for line in template.lines() {
        let trimmed = line.trim_start();
        if !line.starts_with(char::is_whitespace) && !trimmed.is_empty() {
            let mut words = line.split_whitespace();
            let kind = words.next().unwrap_or_default();
            section = words.next().unwrap_or(kind).to_owned();
            servers_done = false;
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let mut words = trimmed.split_whitespace();
        match words.next() {
            Some("bind") => {
                let port = free_port();
                ports.insert(section.clone(), port);
                out.push_str(&format!("    bind 127.0.0.1:{port}\n"));
            }
            Some("server") => {
                if servers_done {
                    continue;
                }
                servers_done = true;
                // server NAME ADDRESS OPTIONS...
                let options: Vec<&str> = words.skip(2).collect();
                for b in backends {
                    let mut opts = Vec::new();
                    let mut after_port = false;
                    for o in &options {
                        if after_port {
                            opts.push(b.api_port.to_string());
                            after_port = false;
                        } else {
                            after_port = *o == "port";
                            opts.push((*o).to_owned());
                        }
                    }
                    out.push_str(&format!(
                        "    server {} 127.0.0.1:{} {}\n",
                        b.name,
                        b.pg_port,
                        opts.join(" ")
                    ));
                }
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    (out, ports)
}

/// `haproxy -c` on a configuration file: `Ok` when valid, else HAProxy's complaint.
pub fn check(binary: &Path, config: &Path) -> anyhow::Result<()> {
    let out = Command::new(binary)
        .arg("-c")
        .arg("-f")
        .arg(config)
        .output()
        .context("run haproxy -c")?;
    anyhow::ensure!(
        out.status.success(),
        "haproxy -c -f {}: {}{}",
        config.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Through a proxy on `port`: the postgres port of the server reached and whether it is in
/// recovery, on a fresh connection as the superuser (`None` when nothing answers).
pub async fn reached(port: u16, password: &str) -> Option<(u16, bool)> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user("postgres")
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2));
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(conn);
    let row = client
        .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
        .await
        .ok()?;
    let port: i32 = row.get(0);
    Some((u16::try_from(port).ok()?, row.get(1)))
}

/// The body of a chunked HTTP response (HAProxy's stats page answers chunked even to HTTP/1.0).
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// A running HAProxy; dropping it stops it by PID.
pub struct HaProxy {
    /// Listening port of each section with a `bind` (`primary`, `replicas`, `batman`, `stats`).
    pub ports: BTreeMap<String, u16>,
    pub process: ProcessGuard,
}

impl HaProxy {
    /// Renders `template` for `backends` into `dir/<name>.cfg`, checks it and starts HAProxy in
    /// the foreground; returns once every bound port accepts connections.
    pub async fn start(
        dir: &Path,
        name: &str,
        template: &str,
        backends: &[Backend],
    ) -> anyhow::Result<HaProxy> {
        let binary = binary().context("haproxy is not installed")?;
        let (text, ports) = render(template, backends);
        let config = dir.join(format!("{name}.cfg"));
        std::fs::write(&config, text)?;
        check(&binary, &config)?;
        let mut cmd = Command::new(&binary);
        cmd.arg("-db").arg("-f").arg(&config);
        let mut process = ProcessGuard::spawn(name, cmd, &dir.join(format!("{name}.log")))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in ports.values() {
            while tokio::net::TcpStream::connect(("127.0.0.1", *port))
                .await
                .is_err()
            {
                anyhow::ensure!(
                    process.is_running() && Instant::now() < deadline,
                    "haproxy did not listen on {port}; its log:\n{}",
                    process.log_tail(20)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(HaProxy { ports, process })
    }

    /// The state HAProxy's health checks give each server of `section` (`UP`, `DOWN`, or a
    /// transition such as `UP 1/2`), from the `stats` section's CSV page.
    pub async fn server_states(&self, section: &str) -> Option<BTreeMap<String, String>> {
        let port = *self.ports.get("stats")?;
        // HTTP/1.0, so that HAProxy answers without chunked encoding.
        let fetch = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()?;
            stream.write_all(b"GET /;csv HTTP/1.0\r\n\r\n").await.ok()?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.ok()?;
            Some(String::from_utf8_lossy(&response).into_owned())
        };
        let response = tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .ok()??;
        let (head, body) = response.split_once("\r\n\r\n")?;
        if head.split_whitespace().nth(1) != Some("200") {
            return None;
        }
        let csv = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)?
        } else {
            body.to_owned()
        };
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name);
        let (px, sv, status) = (col("pxname")?, col("svname")?, col("status")?);
        let mut states = BTreeMap::new();
        for line in lines {
            let fields: Vec<&str> = line.split(',').collect();
            if fields.get(px) == Some(&section)
                && !matches!(fields.get(sv), Some(&"FRONTEND") | Some(&"BACKEND"))
            {
                states.insert(fields.get(sv)?.to_string(), fields.get(status)?.to_string());
            }
        }
        Some(states)
    }

    /// Waits until HAProxy's checks have settled on `section`: `up` is the only server `UP`,
    /// every other one `DOWN`. HAProxy starts every server as up and takes it out only after
    /// `fall` failed checks (9 s with Patroni's example), so a measurement must wait for this.
    pub async fn wait_settled(
        &self,
        section: &str,
        up: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let states = self.server_states(section).await;
            if let Some(states) = &states {
                if !states.is_empty()
                    && states.iter().all(|(name, state)| {
                        (name == up) == (state == "UP") && (name == up || state == "DOWN")
                    })
                {
                    return Ok(());
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "HAProxy's checks did not settle on {up} alone in {section}: {states:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The port of section `section`.
    pub fn port(&self, section: &str) -> u16 {
        self.ports[section]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n").as_deref(),
            Some("hello, world")
        );
        assert_eq!(dechunk("5\r\nhel"), None);
    }

    #[test]
    fn servers_and_binds_are_rewritten() {
        let backends = [
            Backend {
                name: "a".into(),
                pg_port: 11,
                api_port: 21,
            },
            Backend {
                name: "b".into(),
                pg_port: 12,
                api_port: 22,
            },
        ];
        let (text, ports) = render(PATRONI_STOCK, &backends);
        let port = ports["batman"];
        assert!(
            text.contains(&format!("    bind 127.0.0.1:{port}\n")),
            "{text}"
        );
        assert!(text.contains("    server a 127.0.0.1:11 maxconn 100 check port 21\n"));
        assert!(text.contains("    server b 127.0.0.1:12 maxconn 100 check port 22\n"));
        assert!(!text.contains("5432"));
        assert!(text.contains("default-server inter 3s fall 3 rise 2"));
    }
}
