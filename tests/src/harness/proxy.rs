//! A loopback TCP proxy that a test can cut, black-hole and heal: the way to take a member off
//! etcd, or a leader's replicas off its postgres, without touching either.
//!
//! A **cut** resets every open connection and refuses new ones, as a crashed peer or a firewall
//! sending resets would. A **black hole** keeps every connection open but forwards nothing, in
//! either direction, until healed, as a silent partition does: the other side sees no error,
//! only requests that never complete, which is what its timeouts must handle. Data held back by
//! a black hole is delivered, in order, after healing (TCP retransmits it on a real network).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::ports::free_port;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    Cut,
    BlackHole,
}

/// The mode, and how many cuts there have been: a connection opened before a cut is dropped even
/// when the proxy was healed before the connection noticed.
type State = (Mode, u64);

/// Forwards `127.0.0.1:port` to a target.
#[derive(Debug)]
pub struct TcpProxy {
    pub port: u16,
    state: watch::Sender<State>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts forwarding to `target` (`host:port`).
    pub async fn start(target: String) -> anyhow::Result<TcpProxy> {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let (state, rx) = watch::channel((Mode::Open, 0u64));
        let task = tokio::spawn(accept(listener, target, rx));
        Ok(TcpProxy { port, state, task })
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Drops every open connection and refuses new ones (they are accepted and closed).
    pub fn cut(&self) {
        self.state.send_modify(|(mode, cuts)| {
            *mode = Mode::Cut;
            *cuts += 1;
        });
    }

    /// Keeps connections open but forwards nothing until [`TcpProxy::heal`].
    pub fn black_hole(&self) {
        self.state.send_modify(|(mode, _)| *mode = Mode::BlackHole);
    }

    pub fn heal(&self) {
        self.state.send_modify(|(mode, _)| *mode = Mode::Open);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, target: String, state: watch::Receiver<State>) {
    while let Ok((inbound, _)) = listener.accept().await {
        let mut state = state.clone();
        let (mode, epoch) = *state.borrow_and_update();
        if mode == Mode::Cut {
            drop(inbound);
            continue;
        }
        let target = target.clone();
        tokio::spawn(async move {
            // A connection arriving in a black hole waits, unconnected, for the heal.
            if !until_open(&mut state, epoch).await {
                return;
            }
            let Ok(outbound) = TcpStream::connect(&target).await else {
                return;
            };
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::select! {
                _ = pump(ri, wo, state.clone(), epoch) => {}
                _ = pump(ro, wi, state, epoch) => {}
            }
        });
    }
}

/// Waits while the proxy is a black hole; `false` when the connection must be dropped (a cut
/// since it was opened, or the proxy is gone).
async fn until_open(state: &mut watch::Receiver<State>, epoch: u64) -> bool {
    loop {
        let (mode, cuts) = *state.borrow_and_update();
        if cuts != epoch || mode == Mode::Cut {
            return false;
        }
        if mode == Mode::Open {
            return true;
        }
        if state.changed().await.is_err() {
            return false;
        }
    }
}

/// Copies one direction, holding data back while the proxy is a black hole.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut state: watch::Receiver<State>,
    epoch: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !until_open(&mut state, epoch).await {
            return;
        }
        // Reading stops while black-holed, so the sender's window fills as on a real network.
        // `read` is cancel-safe: nothing is lost when a mode change wins the race.
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        if !until_open(&mut state, epoch).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An echo server on a free port.
    async fn echo() -> String {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, byte: u8, wait: Duration) -> Option<u8> {
        s.write_all(&[byte]).await.ok()?;
        let mut b = [0u8; 1];
        match tokio::time::timeout(wait, s.read(&mut b)).await {
            Ok(Ok(1)) => Some(b[0]),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_black_hole_holds_data_back_and_delivers_it_in_order_after_healing() {
        let proxy = TcpProxy::start(echo().await).await.expect("proxy");
        let mut s = TcpStream::connect(proxy.endpoint()).await.expect("connect");
        assert_eq!(roundtrip(&mut s, 1, Duration::from_secs(5)).await, Some(1));
        proxy.black_hole();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(roundtrip(&mut s, 2, Duration::from_millis(300)).await, None);
        proxy.heal();
        let mut b = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
        assert!(matches!(read, Ok(Ok(1))), "{read:?}");
        assert_eq!(b[0], 2, "the held byte arrives after the heal");
    }

    #[tokio::test]
    async fn a_cut_resets_open_connections_even_when_healed_at_once() {
        let proxy = TcpProxy::start(echo().await).await.expect("proxy");
        let mut s = TcpStream::connect(proxy.endpoint()).await.expect("connect");
        assert_eq!(roundtrip(&mut s, 1, Duration::from_secs(5)).await, Some(1));
        proxy.cut();
        proxy.heal();
        let mut b = [0u8; 1];
        let _ = s.write_all(&[3]).await;
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed: {read:?}");
        let mut fresh = TcpStream::connect(proxy.endpoint()).await.expect("connect");
        assert_eq!(
            roundtrip(&mut fresh, 4, Duration::from_secs(5)).await,
            Some(4)
        );
    }
}
