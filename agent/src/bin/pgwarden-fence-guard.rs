//! The fence guard as its own small executable: it stays resident next to every agent, so it is
//! kept apart from the agent binary (whose start-up maps and relocates far more pages). The agent
//! falls back to `pgwarden fence-guard` when this file is not installed next to it.

fn main() {
    pgwarden::postgres::fence_guard::run_guard(std::env::args_os().skip(1));
}
