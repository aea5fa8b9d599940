//! What `pg_controldata` says about a data directory: the system identifier (which cluster the
//! data belongs to) and the cluster state (whether it was a primary and whether it shut down
//! cleanly). Read before postgres is started, so the HA core can refuse a foreign data directory
//! and never open a former primary for writes before holding the leader key.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// `Database cluster state` from `pg_controldata`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterState {
    InProduction,
    ShutDown,
    ShutDownInRecovery,
    InArchiveRecovery,
    InCrashRecovery,
    ShuttingDown,
    Other(String),
}

impl ClusterState {
    fn parse(s: &str) -> Self {
        match s {
            "in production" => ClusterState::InProduction,
            "shut down" => ClusterState::ShutDown,
            "shut down in recovery" => ClusterState::ShutDownInRecovery,
            "in archive recovery" => ClusterState::InArchiveRecovery,
            "in crash recovery" => ClusterState::InCrashRecovery,
            "shutting down" => ClusterState::ShuttingDown,
            other => ClusterState::Other(other.to_owned()),
        }
    }
}

/// The parts of `pg_controldata` output the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlData {
    pub system_identifier: String,
    pub state: ClusterState,
    pub timeline: Option<u32>,
    pub checkpoint_lsn: Option<u64>,
    /// Every line of pg_controldata's output. Shared: the HA loop copies the control data into
    /// each cycle's observation, and copying ~60 strings every cycle showed in an idle profile.
    pub raw: Arc<BTreeMap<String, String>>,
}

/// Errors reading the control file.
#[derive(Debug, thiserror::Error)]
pub enum ControlDataError {
    #[error("cannot run {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pg_controldata failed: {0}")]
    Failed(String),
    #[error("pg_controldata output has no `{0}` line")]
    Missing(&'static str),
}

/// Parses an LSN written as `X/Y` hex.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    Some((hi << 32) | lo)
}

/// Formats an LSN as `X/Y` hex, as postgres and Patroni do.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses `pg_controldata` text output.
pub fn parse(output: &str) -> Result<ControlData, ControlDataError> {
    let raw: BTreeMap<String, String> = output
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let system_identifier = raw
        .get("Database system identifier")
        .cloned()
        .ok_or(ControlDataError::Missing("Database system identifier"))?;
    let state = raw
        .get("Database cluster state")
        .map(|s| ClusterState::parse(s))
        .ok_or(ControlDataError::Missing("Database cluster state"))?;
    let timeline = raw
        .get("Latest checkpoint's TimeLineID")
        .and_then(|s| s.parse().ok());
    let checkpoint_lsn = raw
        .get("Latest checkpoint location")
        .and_then(|s| parse_lsn(s));
    Ok(ControlData {
        system_identifier,
        state,
        timeline,
        checkpoint_lsn,
        raw: Arc::new(raw),
    })
}

/// The parameters a hot standby needs at least as high as its primary, with the
/// `pg_controldata` line that records the primary's value (replayed from its WAL).
pub const HOT_STANDBY_PARAMETERS: [(&str, &str); 5] = [
    ("max_connections", "max_connections setting"),
    ("max_worker_processes", "max_worker_processes setting"),
    ("max_wal_senders", "max_wal_senders setting"),
    ("max_prepared_transactions", "max_prepared_xacts setting"),
    ("max_locks_per_transaction", "max_locks_per_xact setting"),
];

impl ControlData {
    /// The primary's values of [`HOT_STANDBY_PARAMETERS`] as this control file records them.
    pub fn hot_standby_minimums(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        HOT_STANDBY_PARAMETERS.iter().filter_map(|(param, line)| {
            let value = self.raw.get(*line)?.trim().parse().ok()?;
            Some((*param, value))
        })
    }

    /// The minimum recovery point `(timeline, LSN)` a standby's control file records; `None`
    /// when unset (`0/0`, a primary or a cleanly finished recovery).
    pub fn min_recovery(&self) -> Option<(u32, u64)> {
        let at = self
            .raw
            .get("Minimum recovery ending location")
            .and_then(|v| parse_lsn(v))
            .filter(|at| *at > 0)?;
        let tl = self
            .raw
            .get("Min recovery ending loc's timeline")
            .and_then(|v| v.trim().parse().ok())?;
        Some((tl, at))
    }
}

/// Runs `pg_controldata` on `data_dir`.
pub async fn read(bin_dir: &Path, data_dir: &Path) -> Result<ControlData, ControlDataError> {
    let binary = bin_dir.join("pg_controldata");
    let output = tokio::process::Command::new(&binary)
        .arg(data_dir)
        .env("LC_ALL", "C")
        .env("LANG", "C")
        .output()
        .await
        .map_err(|source| ControlDataError::Spawn {
            binary: binary.display().to_string(),
            source,
        })?;
    if !output.status.success() {
        return Err(ControlDataError::Failed(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    parse(&String::from_utf8_lossy(&output.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimum_recovery_point_is_read_from_the_control_file() {
        let mut c = parse(
            "Database system identifier:           7300000000000000001\n\
             Database cluster state:               shut down in recovery\n\
             Minimum recovery ending location:     0/3000060\n\
             Min recovery ending loc's timeline:   2\n",
        )
        .expect("parses");
        assert_eq!(c.min_recovery(), Some((2, 0x3000060)));
        Arc::make_mut(&mut c.raw).insert("Minimum recovery ending location".into(), "0/0".into());
        assert_eq!(c.min_recovery(), None);
    }

    const SAMPLE: &str = "pg_control version number:            1300
Catalog version number:               202209061
Database system identifier:           7310000000000000001
Database cluster state:               in production
Latest checkpoint location:           0/1A2B3C8
Latest checkpoint's TimeLineID:       3
";

    #[test]
    fn parses_identifier_state_timeline_and_lsn() {
        let cd = parse(SAMPLE).expect("parses");
        assert_eq!(cd.system_identifier, "7310000000000000001");
        assert_eq!(cd.state, ClusterState::InProduction);
        assert_eq!(cd.timeline, Some(3));
        assert_eq!(cd.checkpoint_lsn, Some(0x1A2B3C8));
    }

    #[test]
    fn lsn_round_trips() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("nonsense"), None);
    }

    #[test]
    fn missing_identifier_is_an_error() {
        assert!(matches!(
            parse("Database cluster state: shut down"),
            Err(ControlDataError::Missing(_))
        ));
    }
}
