//! A loopback TCP proxy that a test can cut and heal: the way to take a member off etcd
//! without touching etcd itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::ports::free_port;

/// Forwards `127.0.0.1:port` to a target.
#[derive(Debug)]
pub struct TcpProxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts forwarding to `target` (`host:port`).
    pub async fn start(target: String) -> anyhow::Result<TcpProxy> {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, rx) = watch::channel(0u64);
        let task = tokio::spawn(accept(listener, target, cut.clone(), rx));
        Ok(TcpProxy {
            port,
            cut,
            generation,
            task,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Drops every open connection and refuses new ones (they are accepted and closed).
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    target: String,
    cut: Arc<AtomicBool>,
    generation: watch::Receiver<u64>,
) {
    while let Ok((inbound, _)) = listener.accept().await {
        if cut.load(Ordering::SeqCst) {
            drop(inbound);
            continue;
        }
        let target = target.clone();
        let mut generation = generation.clone();
        generation.mark_unchanged();
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(&target).await else {
                return;
            };
            let (mut ri, mut wi) = inbound.into_split();
            let (mut ro, mut wo) = outbound.into_split();
            tokio::select! {
                _ = tokio::io::copy(&mut ri, &mut wo) => {}
                _ = tokio::io::copy(&mut ro, &mut wi) => {}
                _ = generation.changed() => {}
            }
        });
    }
}
