//! Cron schedules of backups (pure: time is an input).
//!
//! Every member computes the same fire times from the same expressions; which member runs a
//! fire is decided elsewhere (the leader, under the DCS backup lock). A fire that could not run
//! (not the leader, a switchover in progress, another backup running) stays pending until the
//! next fire of the same type replaces it, so a failed or skipped backup is retried "per
//! schedule", never in a tight loop.

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

/// One schedule and its pending fire.
#[derive(Debug, Clone)]
pub struct Entry {
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
    pub fn new(exprs: &[(BackupType, Option<String>)], now: DateTime<Utc>) -> Schedules {
        let entries = exprs
            .iter()
            .filter_map(|(kind, expr)| {
                let expr = expr.as_ref()?;
                let cron = parse(expr).ok()?;
                Some(Entry {
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
    /// makes a differential or incremental one due at the same time pointless.
    pub fn due(&mut self, now: DateTime<Utc>) -> Option<(BackupType, DateTime<Utc>)> {
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
            .filter_map(|e| e.pending.map(|p| (e.kind, p)))
            .min_by_key(|(kind, at)| (kind.rank(), *at))
    }

    /// The pending fire of `kind` at `at` is done (run, or skipped for good).
    pub fn settle(&mut self, kind: BackupType, at: DateTime<Utc>) {
        for e in &mut self.entries {
            if e.kind == kind && e.pending == Some(at) {
                e.pending = None;
            }
            // A full backup also satisfies smaller backups that were due at the same time.
            if kind.rank() < e.kind.rank() && e.pending.is_some_and(|p| p <= at) {
                e.pending = None;
            }
        }
    }

    /// Fires replaced by a newer one before they ran, since the last call.
    pub fn take_missed(&mut self) -> Vec<(BackupType, DateTime<Utc>)> {
        let mut out = Vec::new();
        for e in &mut self.entries {
            out.extend(e.missed.drain(..).map(|t| (e.kind, t)));
        }
        out
    }

    /// The earliest instant something may become due.
    pub fn next_wakeup(&self) -> Option<DateTime<Utc>> {
        self.entries.iter().filter_map(|e| e.next).min()
    }

    /// Next fire per type, for the status report.
    pub fn next_fires(&self) -> Vec<(BackupType, DateTime<Utc>)> {
        self.entries
            .iter()
            .filter_map(|e| e.next.map(|n| (e.kind, n)))
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

    #[test]
    fn five_and_six_field_expressions_parse_and_bad_ones_are_refused() {
        assert!(parse("0 1 * * 0").is_ok());
        assert!(parse("*/20 * * * * *").is_ok());
        assert!(parse("every day").is_err());
        assert!(parse("61 * * * *").is_err());
    }

    #[test]
    fn a_reached_fire_stays_pending_until_settled_and_a_newer_fire_replaces_it() {
        let mut s = Schedules::new(&[(BackupType::Incr, Some("*/10 * * * * *".into()))], at(0));
        assert_eq!(s.due(at(5)), None);
        assert_eq!(s.due(at(10)), Some((BackupType::Incr, at(10))));
        // Not settled (e.g. a switchover was in progress): still pending a moment later.
        assert_eq!(s.due(at(12)), Some((BackupType::Incr, at(10))));
        // Missed entirely: the newest fire replaces the older one, no burst of catch-up runs.
        assert_eq!(s.due(at(35)), Some((BackupType::Incr, at(30))));
        // The replaced fires are reported as missed, once.
        assert_eq!(
            s.take_missed(),
            vec![(BackupType::Incr, at(10)), (BackupType::Incr, at(20))]
        );
        assert!(s.take_missed().is_empty());
        s.settle(BackupType::Incr, at(30));
        assert_eq!(s.due(at(36)), None);
        assert_eq!(s.next_wakeup(), Some(at(40)));
    }

    #[test]
    fn a_full_backup_wins_over_and_settles_smaller_ones_due_together() {
        let mut s = Schedules::new(
            &[
                (BackupType::Incr, Some("*/10 * * * * *".into())),
                (BackupType::Full, Some("*/20 * * * * *".into())),
            ],
            at(0),
        );
        assert_eq!(s.due(at(20)), Some((BackupType::Full, at(20))));
        s.settle(BackupType::Full, at(20));
        assert_eq!(s.due(at(21)), None);
    }
}
