//! Free loopback ports, checked by binding (each test process takes its own range, so parallel
//! test binaries do not hand out the same port).
//!
//! Ports come from below Linux's ephemeral range (32768–60999 by default). Any outgoing
//! connection may take a port in that range. Worse, a client that keeps connecting to a port
//! nobody listens on can connect to itself (TCP simultaneous open) and then hold the port for
//! good. That was seen here: a test's SQL poll of a stopped replica held the replica's postgres
//! port, and postgres could never bind it again.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU16, Ordering};

const FIRST: u16 = 10_000;
const END: u16 = 32_768;
/// Ports per test process before it runs into the next process's range.
const BLOCK: u16 = 150;

static NEXT: AtomicU16 = AtomicU16::new(0);

/// A port on 127.0.0.1 that was free when checked.
pub fn free_port() -> u16 {
    if NEXT.load(Ordering::Relaxed) == 0 {
        // Spread test processes over the range by PID.
        let blocks = u32::from((END - FIRST) / BLOCK);
        let block = u16::try_from(std::process::id() % blocks).unwrap_or(0);
        let base = FIRST + block * BLOCK;
        let _ = NEXT.compare_exchange(0, base, Ordering::Relaxed, Ordering::Relaxed);
    }
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = in_range(n);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Maps any counter value into [FIRST, END), wrapping (the counter itself wraps at u16::MAX).
fn in_range(n: u16) -> u16 {
    FIRST + n.wrapping_sub(FIRST) % (END - FIRST)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_stay_below_the_ephemeral_range() {
        for n in [0, 1, FIRST - 1, FIRST, END - 1, END, 40_000, u16::MAX] {
            let p = in_range(n);
            assert!((FIRST..END).contains(&p), "{n} -> {p}");
        }
        assert_eq!(in_range(FIRST + 5), FIRST + 5);
        let p = free_port();
        assert!((FIRST..END).contains(&p), "{p}");
    }
}
