//! Major-version upgrade of a stopped data directory with `pg_upgrade --link` (15 → 17).
//!
//! # Expected flow
//!
//! 1. Checks, before anything is written: `PG_VERSION` names a major version, the old binaries
//!    are of that version and the new ones of a later one, `pg_controldata` says `shut down`
//!    (a primary that stopped cleanly: not a replica, not a crash), no live postmaster, and no
//!    `postgresql.auto.conf` setting the new version lacks (postgres would refuse to start).
//! 2. `initdb` of the new version into `<data_dir>.upgrade-new` (a sibling, so `--link` can
//!    hard-link: same filesystem), with the same superuser, the `bootstrap.initdb` options and
//!    the old cluster's data checksum setting.
//! 3. `pg_upgrade --check`, then `pg_upgrade --link`. Both servers are started by pg_upgrade on
//!    a private socket directory only (no TCP), with a temporary `hba_file` that trusts local
//!    connections, so the cluster's own `pg_hba.conf` (passwords) does not matter.
//! 4. The agent's files are carried over (`postgresql.conf`, `postgresql.base.conf`,
//!    `pg_hba.conf`, `pg_ident.conf`, `postgresql.auto.conf`, `patroni.dynamic.json`), the
//!    new directory is flushed (`syncfs`) and marked complete ([`COMPLETE_MARKER`]).
//! 5. The swap: the old directory is renamed to `<data_dir>.pre-upgrade-<old major>` and the
//!    new one to `<data_dir>`, then the marker is removed.
//!
//! # Guarantees
//!
//! - Until step 5 the old directory is the cluster: a failure in steps 1–4 leaves it as it was
//!   (pg_upgrade's `global/pg_control.old` rename, made late in `--link`, is undone), and the
//!   new directory stays for inspection; the next attempt removes it (it carries
//!   [`NEW_DIR_MARKER`]; a directory without it is never removed).
//! - An agent that dies between the two renames of step 5 finds no `<data_dir>` but a complete
//!   `<data_dir>.upgrade-new`: [`finish_interrupted_swap`], run at start, renames it into place.
//! - The old directory is kept after success. With `--link` it shares its files with the new
//!   one and cannot be started again once the new cluster has run (pg_upgrade's documented
//!   limit): it is evidence, not a fallback. Delete it when the new cluster is in service.
//!
//! # Assumptions
//!
//! The caller holds the data directory's agent lock (no agent runs postgres on it), runs as the
//! data directory's owner (pg_upgrade refuses root), and `<data_dir>`'s parent is writable
//! and on the same filesystem (a data directory that is itself a mount point cannot be renamed:
//! use a subdirectory of the mount).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::controldata::{self, ClusterState, ControlDataError};

/// Written into the new data directory when it is created: a directory we may remove.
pub const NEW_DIR_MARKER: &str = "pgwarden.upgrade-new";
/// Written into the new data directory once it is upgraded and flushed: safe to swap in.
pub const COMPLETE_MARKER: &str = "pgwarden.upgrade-complete";

/// Files of the agent and the user in the data directory's root that the new directory takes
/// over from the old one (pg_upgrade copies none of them).
const CARRIED_FILES: &[&str] = &[
    "postgresql.conf",
    "postgresql.base.conf",
    "pg_hba.conf",
    "pg_ident.conf",
    "postgresql.auto.conf",
    crate::ha::dynamic_copy::FILE_NAME,
];

/// What to upgrade and with which binaries.
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    pub data_dir: PathBuf,
    /// Binaries of the data directory's current major version.
    pub old_bin_dir: PathBuf,
    /// Binaries of the target major version.
    pub new_bin_dir: PathBuf,
    /// The bootstrap superuser (pg_upgrade connects as it; initdb creates it).
    pub superuser: String,
    /// initdb flags for the new cluster (`bootstrap.initdb` as [`super::initdb::initdb_args`]
    /// renders them); `--data-checksums` is added when the old cluster has checksums.
    pub initdb_args: Vec<String>,
}

/// What an upgrade did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeOutcome {
    pub from_major: u32,
    pub to_major: u32,
    /// Where the old data directory was kept (delete it once the new cluster is in service).
    pub old_kept_at: PathBuf,
    pub duration: Duration,
}

/// Why an upgrade was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// `PG_VERSION` is missing or unreadable: not a data directory.
    #[error("{0} has no readable PG_VERSION: not a data directory")]
    NoVersion(PathBuf),
    /// `PG_VERSION` holds something other than a major version number.
    #[error("{path}/PG_VERSION says {found:?}, not a PostgreSQL major version")]
    UnknownVersion { path: PathBuf, found: String },
    /// A binary directory's `postgres --version` could not be run or read.
    #[error("cannot tell the version of {0}/postgres")]
    BinaryVersion(PathBuf, #[source] std::io::Error),
    /// The old binaries are not of the data directory's version.
    #[error("the data directory is version {data}, but the old binaries in {bin_dir} are {bin}")]
    OldBinariesMismatch {
        data: u32,
        bin: u32,
        bin_dir: PathBuf,
    },
    /// At the agent's start: the binaries chosen for the data directory are of another major
    /// version (postgres would refuse the directory and be restarted over and over).
    #[error(
        "the data directory is PostgreSQL {data}, but the binaries chosen for it ({bin_dir}) are \
         PostgreSQL {bin}: set `postgresql.bin_dirs.{data}` (or `postgresql.bin_dir`) to \
         PostgreSQL {data}'s binaries"
    )]
    BinariesMismatch {
        data: u32,
        bin: u32,
        bin_dir: PathBuf,
    },
    /// The new binaries are not a later major version.
    #[error("the new binaries are version {to}, not later than the data directory's {from}")]
    NotAnUpgrade { from: u32, to: u32 },
    /// The control file could not be read.
    #[error("cannot read the control file")]
    ControlData(#[source] ControlDataError),
    /// The last shutdown was not a clean one of a primary.
    #[error(
        "the data directory's state is {0:?}, not \"shut down\": only a primary's clean \
         shutdown can be upgraded (start it and stop it with -m fast, or promote it first)"
    )]
    NotCleanlyShutDown(ClusterState),
    /// `postmaster.pid` names a live process: a postgres may run on the directory.
    #[error("{0}/postmaster.pid names a live process: postgres may be running on it")]
    Running(PathBuf),
    /// `postgresql.auto.conf` sets parameters the new version does not have.
    #[error("postgresql.auto.conf sets parameters PostgreSQL {to} does not have: {names}; remove them (ALTER SYSTEM RESET) first")]
    UnavailableParameters { to: u32, names: String },
    /// A directory in the way that this module did not create.
    #[error("{0} exists and was not made by a pgwarden upgrade; move it away first")]
    InTheWay(PathBuf),
    /// A file operation on the data directories failed.
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// initdb of the new version failed.
    #[error("initdb of the new cluster failed: {0}")]
    Initdb(String),
    /// `pg_upgrade --check` found the clusters incompatible; nothing was changed.
    #[error("pg_upgrade --check refused the upgrade (the old data directory is unchanged): {0}")]
    Check(String),
    /// `pg_upgrade --link` failed; the old data directory was restored to a startable state.
    #[error("pg_upgrade failed (the old data directory is unchanged; the new one is left in {new_dir} for inspection): {output}")]
    Upgrade { new_dir: PathBuf, output: String },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> UpgradeError {
    let path = path.to_path_buf();
    move |source| UpgradeError::Io { what, path, source }
}

/// `<data_dir><suffix>`, a sibling of the data directory.
fn sibling(data_dir: &Path, suffix: &str) -> PathBuf {
    let mut name = data_dir.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Where the new cluster is made.
pub fn new_dir_of(data_dir: &Path) -> PathBuf {
    sibling(data_dir, ".upgrade-new")
}

/// Where the old data directory is kept after the swap.
pub fn kept_dir_of(data_dir: &Path, from_major: u32) -> PathBuf {
    sibling(data_dir, &format!(".pre-upgrade-{from_major}"))
}

/// The major version `PG_VERSION` names (`15`; `9.6` is 9, which is refused later as too old
/// for our binaries anyway).
pub fn data_dir_major(data_dir: &Path) -> Result<u32, UpgradeError> {
    let text = std::fs::read_to_string(data_dir.join("PG_VERSION"))
        .map_err(|_| UpgradeError::NoVersion(data_dir.to_path_buf()))?;
    parse_major(text.trim()).ok_or_else(|| UpgradeError::UnknownVersion {
        path: data_dir.to_path_buf(),
        found: text.trim().to_owned(),
    })
}

fn parse_major(s: &str) -> Option<u32> {
    let major = s.split('.').next()?;
    (!major.is_empty() && major.bytes().all(|b| b.is_ascii_digit()))
        .then(|| major.parse().ok())
        .flatten()
}

/// The major version of the binaries in `bin_dir`, from `postgres --version`
/// (`postgres (PostgreSQL) 17.12 (Debian 17.12-0+deb13u1)`).
pub async fn binaries_major(bin_dir: &Path) -> Result<u32, UpgradeError> {
    let out = tokio::process::Command::new(bin_dir.join("postgres"))
        .arg("--version")
        .output()
        .await
        .map_err(|e| UpgradeError::BinaryVersion(bin_dir.to_path_buf(), e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version_output(&text).ok_or_else(|| {
        UpgradeError::BinaryVersion(
            bin_dir.to_path_buf(),
            std::io::Error::other(format!("unexpected output {:?}", text.trim())),
        )
    })
}

/// At the agent's start: the binaries [`crate::config::BinDirs`] picks for `data_dir` are of
/// its `PG_VERSION` (after an upgrade, `bin_dirs` may lack the new version). A data directory
/// without a version, or binaries whose version cannot be read, pass: initdb, a clone and
/// postgres itself report those. Asks `pg_controldata --version`, which the agent runs anyway.
pub async fn check_binaries_match(
    bin_dirs: &crate::config::BinDirs,
    data_dir: &Path,
) -> Result<(), UpgradeError> {
    let Ok(data) = data_dir_major(data_dir) else {
        return Ok(());
    };
    let bin_dir = bin_dirs.for_data_dir(data_dir);
    let Ok(out) = tokio::process::Command::new(bin_dir.join("pg_controldata"))
        .arg("--version")
        .output()
        .await
    else {
        return Ok(());
    };
    match parse_version_output(&String::from_utf8_lossy(&out.stdout)) {
        Some(bin) if bin != data => Err(UpgradeError::BinariesMismatch { data, bin, bin_dir }),
        _ => Ok(()),
    }
}

fn parse_version_output(text: &str) -> Option<u32> {
    let rest = text.split("(PostgreSQL)").nth(1)?.trim_start();
    let version = rest.split_whitespace().next()?;
    parse_major(version)
}

/// Names in `postgresql.auto.conf` that `to_major` does not have.
fn unavailable_auto_settings(data_dir: &Path, to_major: u32) -> Vec<String> {
    let text = std::fs::read_to_string(data_dir.join("postgresql.auto.conf")).unwrap_or_default();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split('=').next())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .filter(|name| super::versioned_params::unavailable(name, to_major * 10_000).is_some())
        .collect()
}

/// The checks of step 1, which change nothing; returns `(from, to, checksums)`.
pub async fn preflight(req: &UpgradeRequest) -> Result<(u32, u32, bool), UpgradeError> {
    let from = data_dir_major(&req.data_dir)?;
    let old_bin = binaries_major(&req.old_bin_dir).await?;
    if old_bin != from {
        return Err(UpgradeError::OldBinariesMismatch {
            data: from,
            bin: old_bin,
            bin_dir: req.old_bin_dir.clone(),
        });
    }
    let to = binaries_major(&req.new_bin_dir).await?;
    if to <= from {
        return Err(UpgradeError::NotAnUpgrade { from, to });
    }
    // A postmaster.pid whose process is gone is a crash's leftover: the state check below
    // refuses that directory, with the better reason.
    if super::supervisor::live_postmaster_pid(&req.data_dir).is_some() {
        return Err(UpgradeError::Running(req.data_dir.clone()));
    }
    let control = controldata::read(&req.old_bin_dir, &req.data_dir)
        .await
        .map_err(UpgradeError::ControlData)?;
    if control.state != ClusterState::ShutDown {
        return Err(UpgradeError::NotCleanlyShutDown(control.state));
    }
    let checksums = control
        .raw
        .get("Data page checksum version")
        .is_some_and(|v| v.trim() != "0");
    let names = unavailable_auto_settings(&req.data_dir, to);
    if !names.is_empty() {
        return Err(UpgradeError::UnavailableParameters {
            to,
            names: names.join(", "),
        });
    }
    Ok((from, to, checksums))
}

/// Upgrades `req.data_dir` in place (see the module documentation for the flow and what is
/// guaranteed on failure).
pub async fn upgrade(req: &UpgradeRequest) -> Result<UpgradeOutcome, UpgradeError> {
    let started = Instant::now();
    let (from, to, checksums) = preflight(req).await?;
    let new_dir = new_dir_of(&req.data_dir);
    let kept = kept_dir_of(&req.data_dir, from);
    if kept.exists() {
        return Err(UpgradeError::InTheWay(kept));
    }
    remove_previous_attempt(&new_dir)?;
    init_new_cluster(req, &new_dir, checksums).await?;

    let work = tempfile::Builder::new()
        .prefix("pgwarden-upgrade-")
        .tempdir()
        .map_err(io("create a work directory in", &std::env::temp_dir()))?;
    let hba = work.path().join("pg_hba.conf");
    std::fs::write(&hba, "local all all trust\n").map_err(io("write", &hba))?;
    run_pg_upgrade(req, &new_dir, work.path(), &hba, true)
        .await
        .map_err(UpgradeError::Check)?;
    if let Err(output) = run_pg_upgrade(req, &new_dir, work.path(), &hba, false).await {
        restore_old_control_file(&req.data_dir)?;
        return Err(UpgradeError::Upgrade { new_dir, output });
    }

    for name in CARRIED_FILES {
        let from_path = req.data_dir.join(name);
        if from_path.exists() {
            let to_path = new_dir.join(name);
            std::fs::copy(&from_path, &to_path).map_err(io("copy", &from_path))?;
        }
    }
    super::initdb::sync_data_dir(&new_dir)
        .await
        .map_err(io("flush", &new_dir))?;
    let complete = new_dir.join(COMPLETE_MARKER);
    std::fs::write(&complete, "").map_err(io("write", &complete))?;
    sync_dir(&new_dir)?;

    std::fs::rename(&req.data_dir, &kept).map_err(io("move aside", &req.data_dir))?;
    std::fs::rename(&new_dir, &req.data_dir).map_err(io("move into place", &new_dir))?;
    if let Some(parent) = req.data_dir.parent() {
        sync_dir(parent)?;
    }
    clear_markers(&req.data_dir)?;
    Ok(UpgradeOutcome {
        from_major: from,
        to_major: to,
        old_kept_at: kept,
        duration: started.elapsed(),
    })
}

/// Step 5 after a crash between its two renames: `<data_dir>` is missing and the new
/// directory is complete. Returns whether it moved the new directory into place.
pub fn finish_interrupted_swap(data_dir: &Path) -> Result<bool, UpgradeError> {
    let new_dir = new_dir_of(data_dir);
    if data_dir.exists() || !new_dir.join(COMPLETE_MARKER).exists() {
        return Ok(false);
    }
    std::fs::rename(&new_dir, data_dir).map_err(io("move into place", &new_dir))?;
    clear_markers(data_dir)?;
    Ok(true)
}

fn clear_markers(data_dir: &Path) -> Result<(), UpgradeError> {
    for marker in [COMPLETE_MARKER, NEW_DIR_MARKER] {
        let path = data_dir.join(marker);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove", &path)(e)),
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), UpgradeError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io("flush", dir))
}

/// Removes a previous attempt's new directory, but only one that carries our marker.
fn remove_previous_attempt(new_dir: &Path) -> Result<(), UpgradeError> {
    if !new_dir.exists() {
        return Ok(());
    }
    if !new_dir.join(NEW_DIR_MARKER).exists() {
        return Err(UpgradeError::InTheWay(new_dir.to_path_buf()));
    }
    std::fs::remove_dir_all(new_dir).map_err(io("remove", new_dir))
}

async fn init_new_cluster(
    req: &UpgradeRequest,
    new_dir: &Path,
    checksums: bool,
) -> Result<(), UpgradeError> {
    super::data_dir::make_private(new_dir).map_err(io("create", new_dir))?;
    let mut args = req.initdb_args.clone();
    let has_checksums_flag = args.iter().any(|a| a == "--data-checksums" || a == "-k");
    if checksums && !has_checksums_flag {
        args.push("--data-checksums".into());
    }
    if !checksums {
        // initdb 18 turns checksums on by default; pg_upgrade needs the old cluster's setting.
        args.retain(|a| a != "--data-checksums" && a != "-k");
    }
    let output = tokio::process::Command::new(req.new_bin_dir.join("initdb"))
        .arg("-D")
        .arg(new_dir)
        .arg("--username")
        .arg(&req.superuser)
        .arg("--no-sync")
        .args(&args)
        .output()
        .await
        .map_err(io("run initdb for", new_dir))?;
    if !output.status.success() {
        return Err(UpgradeError::Initdb(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    // After initdb: it wants an empty directory.
    let marker = new_dir.join(NEW_DIR_MARKER);
    std::fs::write(&marker, "").map_err(io("write", &marker))
}

/// Runs pg_upgrade; `Err` carries the end of its output.
async fn run_pg_upgrade(
    req: &UpgradeRequest,
    new_dir: &Path,
    work: &Path,
    hba: &Path,
    check: bool,
) -> Result<(), String> {
    let server_options = format!("-c hba_file={}", hba.display());
    let mut cmd = tokio::process::Command::new(req.new_bin_dir.join("pg_upgrade"));
    cmd.current_dir(work)
        .arg("--old-bindir")
        .arg(&req.old_bin_dir)
        .arg("--new-bindir")
        .arg(&req.new_bin_dir)
        .arg("--old-datadir")
        .arg(&req.data_dir)
        .arg("--new-datadir")
        .arg(new_dir)
        .arg("--username")
        .arg(&req.superuser)
        .arg("--socketdir")
        .arg(work)
        .arg("--old-options")
        .arg(&server_options)
        .arg("--new-options")
        .arg(&server_options)
        .arg("--link")
        // `sync_data_dir` flushes the new directory with one syncfs instead.
        .arg("--no-sync")
        .env("LC_ALL", "C")
        .env("LANG", "C")
        .env_remove("PGDATA")
        .env_remove("PGHOST")
        .env_remove("PGPORT");
    if check {
        cmd.arg("--check");
    }
    let output = cmd
        .output()
        .await
        .map_err(|e| format!("cannot run pg_upgrade: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    Err(lines[lines.len().saturating_sub(15)..].join("\n"))
}

/// pg_upgrade --link renames the old `global/pg_control` to `pg_control.old` before it links
/// the files; until the new cluster starts, renaming it back makes the old cluster startable
/// again (pg_upgrade's documentation, "Reverting to old cluster").
fn restore_old_control_file(data_dir: &Path) -> Result<(), UpgradeError> {
    let control = data_dir.join("global/pg_control");
    let old = data_dir.join("global/pg_control.old");
    if !control.exists() && old.exists() {
        std::fs::rename(&old, &control).map_err(io("restore", &old))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_pg_version_and_postgres_version_output() {
        assert_eq!(parse_major("15"), Some(15));
        assert_eq!(parse_major("9.6"), Some(9));
        assert_eq!(parse_major("x15"), None);
        assert_eq!(parse_major(""), None);
        assert_eq!(
            parse_version_output("postgres (PostgreSQL) 17.12 (Debian 17.12-0+deb13u1)\n"),
            Some(17)
        );
        assert_eq!(
            parse_version_output("postgres (PostgreSQL) 15.18\n"),
            Some(15)
        );
        assert_eq!(parse_version_output("something else"), None);
    }

    #[test]
    fn a_data_directory_without_a_known_version_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            data_dir_major(dir.path()),
            Err(UpgradeError::NoVersion(_))
        ));
        std::fs::write(dir.path().join("PG_VERSION"), "banana\n").expect("write");
        assert!(matches!(
            data_dir_major(dir.path()),
            Err(UpgradeError::UnknownVersion { .. })
        ));
        std::fs::write(dir.path().join("PG_VERSION"), "15\n").expect("write");
        assert_eq!(data_dir_major(dir.path()).expect("15"), 15);
    }

    #[test]
    fn alter_system_settings_the_new_version_lacks_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("postgresql.auto.conf"),
            "# Do not edit this file manually!\nwork_mem = '8MB'\nold_snapshot_threshold = '1h'\n",
        )
        .expect("write");
        assert_eq!(
            unavailable_auto_settings(dir.path(), 17),
            vec!["old_snapshot_threshold".to_owned()]
        );
        assert!(unavailable_auto_settings(dir.path(), 16).is_empty());
    }

    #[test]
    fn an_interrupted_swap_is_finished_only_when_the_new_directory_is_complete() {
        let parent = tempfile::tempdir().expect("tempdir");
        let data = parent.path().join("data");
        let new_dir = new_dir_of(&data);
        std::fs::create_dir(&new_dir).expect("mkdir");
        std::fs::write(new_dir.join("PG_VERSION"), "17\n").expect("write");
        std::fs::write(new_dir.join(NEW_DIR_MARKER), "").expect("write");
        // Not complete: pg_upgrade may not have finished; nothing is moved.
        assert!(!finish_interrupted_swap(&data).expect("checked"));
        assert!(!data.exists());
        std::fs::write(new_dir.join(COMPLETE_MARKER), "").expect("write");
        assert!(finish_interrupted_swap(&data).expect("finished"));
        assert_eq!(data_dir_major(&data).expect("17"), 17);
        assert!(!data.join(COMPLETE_MARKER).exists());
        assert!(!data.join(NEW_DIR_MARKER).exists());
        // With the data directory in place nothing happens.
        assert!(!finish_interrupted_swap(&data).expect("checked"));
    }

    #[test]
    fn a_directory_in_the_way_is_removed_only_when_an_upgrade_made_it() {
        let parent = tempfile::tempdir().expect("tempdir");
        let new_dir = parent.path().join("data.upgrade-new");
        std::fs::create_dir(&new_dir).expect("mkdir");
        assert!(matches!(
            remove_previous_attempt(&new_dir),
            Err(UpgradeError::InTheWay(_))
        ));
        std::fs::write(new_dir.join(NEW_DIR_MARKER), "").expect("write");
        remove_previous_attempt(&new_dir).expect("removed");
        assert!(!new_dir.exists());
    }
}
