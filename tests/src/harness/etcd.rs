//! A real etcd (Debian's `etcd-server`) on free loopback ports.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::ports::free_port;
use super::process::ProcessGuard;
use super::wait_until;

/// A running single-member etcd.
#[derive(Debug)]
pub struct Etcd {
    pub process: ProcessGuard,
    pub client_port: u16,
}

impl Etcd {
    /// Starts etcd with its data in `dir/etcd` and waits until it answers.
    pub async fn start(dir: &Path) -> anyhow::Result<Etcd> {
        Self::start_with(dir, |_| {}).await
    }

    /// [`Etcd::start`], with `prepare` applied to the command before it is spawned.
    pub async fn start_with(
        dir: &Path,
        prepare: impl FnOnce(&mut Command),
    ) -> anyhow::Result<Etcd> {
        let binary = std::env::var("PGWARDEN_ETCD_BIN").unwrap_or_else(|_| "etcd".to_owned());
        let client_port = free_port();
        let peer_port = free_port();
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(binary);
        cmd.arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("test={peer}"))
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("warn");
        prepare(&mut cmd);
        let process = ProcessGuard::spawn("etcd", cmd, &dir.join("etcd.log"))?;
        let etcd = Etcd {
            process,
            client_port,
        };
        let endpoint = etcd.endpoint();
        wait_until("etcd answers", Duration::from_secs(30), || {
            let endpoint = endpoint.clone();
            async move {
                match etcd_client::Client::connect([endpoint], None).await {
                    Ok(mut c) => c.get("/", None).await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
        Ok(etcd)
    }

    /// `127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    async fn client(&self) -> anyhow::Result<etcd_client::Client> {
        Ok(etcd_client::Client::connect([self.endpoint()], None).await?)
    }

    /// The value of `key`, if present.
    pub async fn get(&self, key: &str) -> anyhow::Result<Option<String>> {
        let mut c = self.client().await?;
        let r = c.get(key, None).await?;
        Ok(r.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// Every key under `prefix` with its value.
    pub async fn get_prefix(&self, prefix: &str) -> anyhow::Result<Vec<(String, String)>> {
        let mut c = self.client().await?;
        let r = c
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await?;
        Ok(r.kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect())
    }

    pub async fn put(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let mut c = self.client().await?;
        c.put(key, value, None).await?;
        Ok(())
    }

    pub async fn delete(&self, key: &str) -> anyhow::Result<()> {
        let mut c = self.client().await?;
        c.delete(key, None).await?;
        Ok(())
    }

    /// Deletes every key under `prefix` (what `patronictl remove` does to a cluster).
    pub async fn delete_prefix(&self, prefix: &str) -> anyhow::Result<()> {
        let mut c = self.client().await?;
        c.delete(
            prefix,
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await?;
        Ok(())
    }
}
