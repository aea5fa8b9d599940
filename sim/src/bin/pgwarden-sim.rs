//! Runs simulated schedules: one seed (`--seed N [--members M] [--trace]`) or a campaign
//! (`--count N [--from SEED] [--keep-going]`). Exit code 1 names the first failing seed and its
//! replay command; with `--keep-going` every failing seed is printed and the campaign goes on, so
//! a long local run measures how often schedules fail instead of stopping at the first.

use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!(
        "usage: pgwarden-sim --seed N [--members 3|5] [--trace] [--no-failsafe]\n       pgwarden-sim --count N [--from SEED] [--members 3|5] [--keep-going] [--no-failsafe]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seed = None;
    let mut count = None;
    let mut from = None;
    let mut members = None;
    let mut failsafe = true;
    let mut trace = false;
    let mut keep_going = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = || it.next().and_then(|v| v.parse::<u64>().ok());
        match a.as_str() {
            "--seed" => seed = num(),
            "--count" => count = num(),
            "--from" => from = num(),
            "--members" => members = num().map(|m| m as usize),
            "--trace" => trace = true,
            "--keep-going" => keep_going = true,
            "--no-failsafe" => failsafe = false,
            _ => return usage(),
        }
    }
    if let Some(seed) = seed {
        let (result, lines) = pgwarden_sim::sim::run_with(seed, members, trace, failsafe);
        for l in &lines {
            println!("{l}");
        }
        return match result {
            Ok(r) => {
                println!(
                    "seed {seed}: ok ({} steps, {} faults, {} promotions, {} acknowledged writes)",
                    r.steps, r.faults, r.promotions, r.acked
                );
                ExitCode::SUCCESS
            }
            Err(v) => {
                println!("FAILED: {v}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(count) = count else { return usage() };
    let from = from.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() * 1000)
            .unwrap_or(0)
    });
    println!("campaign: {count} schedules from seed {from}");
    let started = std::time::Instant::now();
    if keep_going {
        return keep_going_campaign(from, count, members, failsafe, started);
    }
    match pgwarden_sim::campaign_with(from, count, members, failsafe) {
        Ok(r) => {
            println!("ok: {r} in {:.1?}", started.elapsed());
            ExitCode::SUCCESS
        }
        Err(v) => {
            println!("FAILED: {v}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every seed of the range, printing each failure as it happens and the failing seeds at
/// the end.
fn keep_going_campaign(
    from: u64,
    count: u64,
    members: Option<usize>,
    failsafe: bool,
    started: std::time::Instant,
) -> ExitCode {
    let mut failed = Vec::new();
    let mut passed = pgwarden_sim::CampaignReport::default();
    for seed in from..from.saturating_add(count) {
        let m = members.unwrap_or(if seed % 2 == 0 { 3 } else { 5 });
        match pgwarden_sim::sim::run_with(seed, Some(m), false, failsafe) {
            (Err(v), _) => {
                println!("FAILED: {v}");
                failed.push(seed);
            }
            (Ok(r), _) => passed.add(&r),
        }
    }
    println!(
        "{count} schedules from seed {from} in {:.1?}: {} failed {failed:?}; passed: {passed}",
        started.elapsed(),
        failed.len()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
