//! The simulation in CI: every seed that once failed, then a fixed budget of fresh random
//! schedules whose first seed is printed (a failure prints the exact replay command).
//!
//! `PGWARDEN_SIM_SCHEDULES` changes the budget; `PGWARDEN_SIM_FROM` fixes the first seed.

/// Seeds that found a bug, with the fix they check. Each must pass forever.
const REGRESSIONS: &[(u64, usize, &str)] = &[
    (
        8,
        3,
        "the fence stays armed in pause: a paused leader cut from the DCS was never fenced",
    ),
    (
        7,
        3,
        "sync mode: the sync standby deferred to an asynchronous peer that may not race",
    ),
    (
        100,
        3,
        "a won bootstrap race whose lock could not be taken is withdrawn",
    ),
    (
        6,
        3,
        "pg_rewind against an unreachable leader is retried, not a permanent failure",
    ),
    (
        2056,
        3,
        "a renewal answered after its fence deadline is unconfirmed; no late opening for writes",
    ),
    (
        1002,
        3,
        "a standby on a timeline newer than the leader's is stopped and rewound",
    ),
    (
        2013,
        5,
        "a standby the cluster's timeline left behind is stopped and rewound",
    ),
    (
        2024,
        3,
        "the former leader of a switchover races when nobody else can",
    ),
    (
        2147,
        5,
        "switchover in sync mode with no recorded standby: the former leader takes over",
    ),
    (
        4020,
        3,
        "a sync leader hands over only to its synchronous standby",
    ),
    (
        351818649976,
        3,
        "a paused leader keeps the lock while postgres runs (promotion under way)",
    ),
];

#[test]
fn regression_seeds_pass() {
    for (seed, members, what) in REGRESSIONS {
        let (result, _) = pgwarden_sim::run(*seed, Some(*members), false);
        if let Err(v) = result {
            panic!("regression seed {seed} ({what}) fails again:\n{v}");
        }
    }
}

#[test]
fn random_schedules_pass() {
    let count = std::env::var("PGWARDEN_SIM_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400u64);
    let from = std::env::var("PGWARDEN_SIM_FROM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 % 1_000_000_000_000)
                .unwrap_or(0)
        });
    println!(
        "simulating {count} schedules, seeds {from}..{}",
        from + count
    );
    let started = std::time::Instant::now();
    match pgwarden_sim::campaign(from, count, None) {
        Ok(r) => println!("{r} in {:.1?}", started.elapsed()),
        Err(v) => panic!("{v}"),
    }
}
