//! WAL archiving: its status (`pg_stat_archiver` and the `.ready` files postgres has not
//! archived yet), and the catch-up a new leader runs so a failover leaves no gap.
//!
//! Why the catch-up: a replica marks streamed segments as already archived (`.done`) unless
//! `archive_mode=always`, and a primary killed mid-flight may not have archived its last
//! complete segments. So after a promotion the new leader pushes every complete segment of
//! earlier timelines still in its `pg_wal`; pgBackRest accepts a segment it already has with
//! the same checksum, so pushing twice is harmless.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::postgres::probe::Probe;

use super::report::ArchiveStatus;

const ARCHIVER_SQL: &str = "SELECT archived_count::text, last_archived_wal, \
     extract(epoch FROM last_archived_time)::text, failed_count::text, last_failed_wal, \
     extract(epoch FROM last_failed_time)::text FROM pg_stat_archiver";

/// Reads `pg_stat_archiver` and scans `pg_wal/archive_status` for `.ready` files.
pub async fn status(
    probe: &Probe,
    data_dir: &Path,
) -> Result<ArchiveStatus, crate::backup::BackupError> {
    let row = probe
        .query_row(ARCHIVER_SQL)
        .await
        .map_err(|e| format!("cannot read pg_stat_archiver: {e}"))?;
    let text = |i: usize| row.get(i).cloned().flatten().filter(|s| !s.is_empty());
    let num = |i: usize| text(i).and_then(|s| s.parse::<f64>().ok());
    let (ready_count, oldest) = ready_segments(data_dir);
    Ok(ArchiveStatus {
        archived_count: num(0).unwrap_or(0.0) as u64,
        last_archived_wal: text(1),
        last_archived_time: num(2),
        failed_count: num(3).unwrap_or(0.0) as u64,
        last_failed_wal: text(4),
        last_failed_time: num(5),
        ready_count,
        oldest_ready_age_seconds: oldest
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
    })
}

/// Number of `.ready` files and the oldest one's modification time.
fn ready_segments(data_dir: &Path) -> (u64, Option<SystemTime>) {
    let mut count = 0;
    let mut oldest: Option<SystemTime> = None;
    let Ok(entries) = std::fs::read_dir(data_dir.join("pg_wal/archive_status")) else {
        return (0, None);
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().ends_with(".ready") {
            continue;
        }
        count += 1;
        if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
            oldest = Some(oldest.map_or(m, |o| o.min(m)));
        }
    }
    (count, oldest)
}

/// A complete WAL segment file name: 24 upper-case hex digits, the first 8 the timeline.
fn segment_timeline(name: &str) -> Option<u32> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(&name[..8], 16).ok()
}

/// Complete segments of timelines before `timeline` in `pg_wal`, oldest first.
pub fn earlier_timeline_segments(data_dir: &Path, timeline: u32) -> Vec<PathBuf> {
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(data_dir.join("pg_wal"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let tl = segment_timeline(&name)?;
            (tl < timeline).then(|| (name, e.path()))
        })
        .collect();
    // Ordered by segment number, then timeline: the names sort that way from character 8 on.
    found.sort_by(|a, b| (&a.0[8..], &a.0[..8]).cmp(&(&b.0[8..], &b.0[..8])));
    found.into_iter().map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_segments_of_earlier_timelines_are_picked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = dir.path().join("pg_wal");
        std::fs::create_dir_all(wal.join("archive_status")).expect("mkdir");
        for name in [
            "000000010000000000000003",
            "000000010000000000000002",
            "000000010000000000000004.partial",
            "000000020000000000000004",
            "00000002.history",
        ] {
            std::fs::write(wal.join(name), "").expect("write");
        }
        std::fs::write(
            wal.join("archive_status/000000020000000000000004.ready"),
            "",
        )
        .expect("write");
        let picked: Vec<String> = earlier_timeline_segments(dir.path(), 2)
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            picked,
            vec!["000000010000000000000002", "000000010000000000000003"]
        );
        let (count, oldest) = ready_segments(dir.path());
        assert_eq!(count, 1);
        assert!(oldest.is_some());
    }
}
