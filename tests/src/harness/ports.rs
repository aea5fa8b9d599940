//! Free loopback ports, checked by binding (each test process takes its own range, so parallel
//! test binaries do not hand out the same port).

use std::net::TcpListener;
use std::sync::atomic::{AtomicU16, Ordering};

static NEXT: AtomicU16 = AtomicU16::new(0);

/// A port on 127.0.0.1 that was free when checked.
pub fn free_port() -> u16 {
    if NEXT.load(Ordering::Relaxed) == 0 {
        // Spread test processes over the range by PID.
        let base = 20000 + (std::process::id() % 200) as u16 * 150;
        let _ = NEXT.compare_exchange(0, base, Ordering::Relaxed, Ordering::Relaxed);
    }
    loop {
        let port = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = if port >= 60000 {
            20000 + port % 1000
        } else {
            port
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
