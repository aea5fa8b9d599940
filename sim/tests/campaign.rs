//! The simulation in CI: every seed that once failed, then a fixed budget of fresh random
//! schedules whose first seed is printed (a failure prints the exact replay command).
//!
//! `PGWARDEN_SIM_SCHEDULES` changes the budget; `PGWARDEN_SIM_FROM` fixes the first seed.

/// Seeds that found a bug, with the fix they check. Each must pass forever.
const REGRESSIONS: &[(u64, usize, &str)] = &[];

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
        .unwrap_or(1500u64);
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
