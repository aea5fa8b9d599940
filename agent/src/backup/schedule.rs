//! Cron schedules of backups (pure: time is an input).
//!
//! Every member computes the same fire times from the same expressions; which member runs a
//! fire is decided elsewhere (the leader, under the DCS backup lock). A fire that could not run
//! (not the leader, a switchover in progress, another backup running) stays pending until the
//! next fire of the same repository and type replaces it, so a failed or skipped backup is
//! retried "per schedule", never in a tight loop. Each repository's schedules are independent:
//! a backup into one does not settle a fire of another.

use chrono::{DateTime, Local, Utc};
use croner::Cron;

use super::BackupType;

/// Parses a cron expression: 5 fields (minute first) or 6 with seconds first.
pub fn parse(expr: &str) -> Result<Cron, String> {
    Cron::new(expr)
        .with_seconds_optional()
        .parse()
        .map_err(|e| format!("{expr:?} is not a cron expression: {e}"))
}

/// The next fire strictly after `after`, in the agent's local time zone (as cron does).
pub fn next_after(cron: &Cron, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&after.with_timezone(&Local), false)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A fire that came due: back up into `repo` (1 = `repo1`) with `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fire {
    pub repo: u32,
    pub kind: BackupType,
    pub at: DateTime<Utc>,
}

/// The key of a (repository, type) in the DCS record of runs (`backup_schedule`) and in the
/// report's `next`: repo1 keeps the bare type that agents before per-repository schedules
/// wrote, so a rolling upgrade neither repeats nor skips repo1's fires.
pub fn record_key(repo: u32, kind: BackupType) -> String {
    if repo == 1 {
        kind.as_str().to_owned()
    } else {
        format!("repo{repo}-{kind}")
    }
}

/// Whether the DCS record of runs says a leader already ran (or started) this fire.
pub fn already_ran(
    record: &std::collections::BTreeMap<String, DateTime<Utc>>,
    fire: &Fire,
) -> bool {
    record
        .get(&record_key(fire.repo, fire.kind))
        .is_some_and(|done| *done >= fire.at)
}

/// One schedule and its pending fire.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The repository number (`--repo`).
    pub repo: u32,
    pub kind: BackupType,
    pub expr: String,
    cron: Cron,
    /// The next fire time not yet reached.
    pub next: Option<DateTime<Utc>>,
    /// A fire time that was reached and not yet run (or given up).
    pub pending: Option<DateTime<Utc>>,
    /// Pending fires replaced by a newer one before they ran.
    missed: Vec<DateTime<Utc>>,
}

/// All configured schedules.
#[derive(Debug, Clone, Default)]
pub struct Schedules {
    pub entries: Vec<Entry>,
}

impl Schedules {
    /// Builds the schedules from validated expressions; the first fires are after `now`.
    pub fn new(exprs: &[(u32, BackupType, Option<String>)], now: DateTime<Utc>) -> Schedules {
        let entries = exprs
            .iter()
            .filter_map(|(repo, kind, expr)| {
                let expr = expr.as_ref()?;
                let cron = parse(expr).ok()?;
                Some(Entry {
                    repo: *repo,
                    kind: *kind,
                    next: next_after(&cron, now),
                    expr: expr.clone(),
                    cron,
                    pending: None,
                    missed: Vec::new(),
                })
            })
            .collect();
        Schedules { entries }
    }

    /// Moves reached fire times to `pending` (a newer fire replaces an older pending one) and
    /// returns the pending fire to try now: the biggest backup type first, since a full backup
    /// makes a differential or incremental one of the same repository due at the same time
    /// pointless; then the oldest fire, then the lowest repository.
    pub fn due(&mut self, now: DateTime<Utc>) -> Option<Fire> {
        for e in &mut self.entries {
            // Walk fire by fire so `pending` ends as the newest fire reached; after a very
            // long pause (a suspended machine) jump to now instead of walking forever.
            let mut steps = 0;
            while let Some(next) = e.next.filter(|n| *n <= now) {
                if let Some(old) = e.pending.replace(next) {
                    if e.missed.len() < 100 {
                        e.missed.push(old);
                    }
                }
                steps += 1;
                e.next = next_after(&e.cron, if steps < 10_000 { next } else { now });
            }
        }
        self.entries
            .iter()
            .filter_map(|e| {
                e.pending.map(|at| Fire {
                    repo: e.repo,
                    kind: e.kind,
                    at,
                })
            })
            .min_by_key(|f| (f.kind.rank(), f.at, f.repo))
    }

    /// The pending fire `fire` is done (run, or skipped for good).
    pub fn settle(&mut self, fire: &Fire) {
        for e in self.entries.iter_mut().filter(|e| e.repo == fire.repo) {
            if e.kind == fire.kind && e.pending == Some(fire.at) {
                e.pending = None;
            }
            // A full backup also satisfies smaller backups of its repository that were due at
            // the same time; another repository's are still to be taken.
            if fire.kind.rank() < e.kind.rank() && e.pending.is_some_and(|p| p <= fire.at) {
                e.pending = None;
            }
        }
    }

    /// Fires replaced by a newer one before they ran, since the last call.
    pub fn take_missed(&mut self) -> Vec<Fire> {
        let mut out = Vec::new();
        for e in &mut self.entries {
            let (repo, kind) = (e.repo, e.kind);
            out.extend(e.missed.drain(..).map(|at| Fire { repo, kind, at }));
        }
        out
    }

    /// The earliest instant something may become due.
    pub fn next_wakeup(&self) -> Option<DateTime<Utc>> {
        self.entries.iter().filter_map(|e| e.next).min()
    }

    /// Next fire per repository and type, for the status report.
    pub fn next_fires(&self) -> Vec<Fire> {
        self.entries
            .iter()
            .filter_map(|e| {
                e.next.map(|at| Fire {
                    repo: e.repo,
                    kind: e.kind,
                    at,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(s.into())
    }

    fn fire(repo: u32, kind: BackupType, s: u32) -> Fire {
        Fire {
            repo,
            kind,
            at: at(s),
        }
    }

    #[test]
    fn five_and_six_field_expressions_parse_and_bad_ones_are_refused() {
        assert!(parse("0 1 * * 0").is_ok());
        assert!(parse("*/20 * * * * *").is_ok());
        assert!(parse("every day").is_err());
        assert!(parse("61 * * * *").is_err());
    }

    #[test]
    fn a_reached_fire_stays_pending_until_settled_and_a_newer_fire_replaces_it() {
        let mut s = Schedules::new(
            &[(1, BackupType::Incr, Some("*/10 * * * * *".into()))],
            at(0),
        );
        assert_eq!(s.due(at(5)), None);
        assert_eq!(s.due(at(10)), Some(fire(1, BackupType::Incr, 10)));
        // Not settled (e.g. a switchover was in progress): still pending a moment later.
        assert_eq!(s.due(at(12)), Some(fire(1, BackupType::Incr, 10)));
        // Missed entirely: the newest fire replaces the older one, no burst of catch-up runs.
        assert_eq!(s.due(at(35)), Some(fire(1, BackupType::Incr, 30)));
        // The replaced fires are reported as missed, once.
        assert_eq!(
            s.take_missed(),
            vec![fire(1, BackupType::Incr, 10), fire(1, BackupType::Incr, 20)]
        );
        assert!(s.take_missed().is_empty());
        s.settle(&fire(1, BackupType::Incr, 30));
        assert_eq!(s.due(at(36)), None);
        assert_eq!(s.next_wakeup(), Some(at(40)));
    }

    #[test]
    fn a_full_backup_wins_over_and_settles_smaller_ones_due_together() {
        let mut s = Schedules::new(
            &[
                (1, BackupType::Incr, Some("*/10 * * * * *".into())),
                (1, BackupType::Full, Some("*/20 * * * * *".into())),
            ],
            at(0),
        );
        assert_eq!(s.due(at(20)), Some(fire(1, BackupType::Full, 20)));
        s.settle(&fire(1, BackupType::Full, 20));
        assert_eq!(s.due(at(21)), None);
    }

    #[test]
    fn each_repository_runs_its_own_fires_and_one_does_not_settle_another() {
        let mut s = Schedules::new(
            &[
                (1, BackupType::Full, Some("*/20 * * * * *".into())),
                (2, BackupType::Full, Some("*/20 * * * * *".into())),
                (2, BackupType::Incr, Some("*/10 * * * * *".into())),
            ],
            at(0),
        );
        // Same type and time: the lower repository first; its run leaves repo2's pending.
        assert_eq!(s.due(at(20)), Some(fire(1, BackupType::Full, 20)));
        s.settle(&fire(1, BackupType::Full, 20));
        assert_eq!(s.due(at(21)), Some(fire(2, BackupType::Full, 20)));
        // repo2's full backup satisfies repo2's incremental due with it.
        s.settle(&fire(2, BackupType::Full, 20));
        assert_eq!(s.due(at(22)), None);
        assert_eq!(s.due(at(30)), Some(fire(2, BackupType::Incr, 30)));
        assert_eq!(s.next_wakeup(), Some(at(40)));
        assert_eq!(
            s.next_fires(),
            vec![
                fire(1, BackupType::Full, 40),
                fire(2, BackupType::Full, 40),
                fire(2, BackupType::Incr, 40)
            ]
        );
    }

    #[test]
    fn the_record_of_runs_is_keyed_by_repository_and_type() {
        // Written by agents before per-repository schedules: the bare type is repo1's.
        let record: std::collections::BTreeMap<String, DateTime<Utc>> = [
            ("full".to_owned(), at(20)),
            ("repo2-incr".to_owned(), at(10)),
        ]
        .into();
        assert_eq!(record_key(1, BackupType::Full), "full");
        assert_eq!(record_key(3, BackupType::Diff), "repo3-diff");
        assert!(already_ran(&record, &fire(1, BackupType::Full, 20)));
        assert!(!already_ran(&record, &fire(1, BackupType::Full, 40)));
        // repo1's run does not suppress repo2's fire of the same type and time.
        assert!(!already_ran(&record, &fire(2, BackupType::Full, 20)));
        assert!(already_ran(&record, &fire(2, BackupType::Incr, 10)));
        assert!(!already_ran(&record, &fire(2, BackupType::Incr, 20)));
    }
}
